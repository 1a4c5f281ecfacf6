"""Multi-agent coding as a LangGraph graph: for each file an engineer node has a coder write the code, then a tester
write its tests and a reviewer name its problem (both read the coder's output), all files at once (`Send`); a last
node gathers the files' work.

    python examples/multi_agent.py [--base-url URL] [--model smollm2] [--max-tokens 64]
"""

from __future__ import annotations

import operator
from typing import Annotated, TypedDict

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.types import Send

from harness import compare, make_chat, parse_args

TASKS = [
    "a function `is_leap_year(year)` that follows the Gregorian rules",
    "a function `word_count(text)` that returns a dict from each lowercase word to its count",
    "a function `celsius_to_fahrenheit(c)` that rounds to one decimal",
]
# Prompts for a small model (the default has 135M parameters): each agent gets one file's code, which it reads
# better than a long text of all the files; asked to review all of them at once, such a model lists the tasks back.
CODER = ChatPromptTemplate.from_messages([
    ("system", "You are a senior Python programmer. Answer with the code only, in one code block."),
    ("human", "Write {task}."),
])
TESTER = ChatPromptTemplate.from_messages([
    ("human", "Write a pytest test for this code. Use assert with a known input and output.\n\n{code}"),
])
REVIEWER = ChatPromptTemplate.from_messages([
    ("human", "Task: {task}\n{code}\n\nWhat is wrong with this code? Answer in one sentence."),
])


class TeamState(TypedDict):
    tasks: list[str]
    files: Annotated[list[dict], operator.add]
    report: str


def build_graph(chat) -> CompiledStateGraph:
    coder = CODER | chat | StrOutputParser()
    tester = TESTER | chat | StrOutputParser()
    reviewer = REVIEWER | chat.bind(stop=["\n"]) | StrOutputParser()

    def assign(state: TeamState) -> list[Send]:
        return [Send("engineer", {"task": task}) for task in state["tasks"]]

    def engineer(state: dict) -> dict:
        task = state["task"]
        code = coder.invoke({"task": task})
        return {"files": [{"task": task, "code": code, "tests": tester.invoke({"code": code}),
                           "review": reviewer.invoke({"task": task, "code": code})}]}

    def gather(state: TeamState) -> dict:
        return {"report": "\n\n".join(f"## {f['task']}\n{f['code'].strip()}\nTests:\n{f['tests'].strip()}\n"
                                         f"Review: {f['review'].strip()}" for f in state["files"])}

    graph = StateGraph(TeamState)
    graph.add_node("engineer", engineer)
    graph.add_node("gather", gather)
    graph.add_conditional_edges(START, assign, ["engineer"])
    graph.add_edge("engineer", "gather")
    graph.add_edge("gather", END)
    return graph.compile()


if __name__ == "__main__":
    args = parse_args(__doc__.splitlines()[0], max_tokens=64)
    compare(build_graph, make_chat(args), {"tasks": TASKS}, output=lambda state: state["report"])
