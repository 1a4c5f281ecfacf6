"""Multi-agent coding as a LangGraph graph: for each file an engineer node has a coder write the code and a tester
its tests (the tester reads the coder's output), all files at once (`Send`); a reviewer then reads all of it.

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
CODER = ChatPromptTemplate.from_messages([
    ("system", "You are a senior Python programmer. Answer with the code only, in one code block."),
    ("human", "Write {task}."),
])
TESTER = ChatPromptTemplate.from_messages([
    ("system", "You are a tester. Answer with pytest tests only, in one code block."),
    ("human", "Write tests for this code:\n{code}"),
])
REVIEWER = ChatPromptTemplate.from_messages([
    ("system", "You are a code reviewer. You never write code: you name problems, one short line each."),
    ("human", "{work}\n\nName the three most important problems of this work."),
])


class TeamState(TypedDict):
    tasks: list[str]
    files: Annotated[list[dict], operator.add]
    review: str


def build_graph(chat) -> CompiledStateGraph:
    coder = CODER | chat | StrOutputParser()
    tester = TESTER | chat | StrOutputParser()
    reviewer = REVIEWER | chat | StrOutputParser()

    def assign(state: TeamState) -> list[Send]:
        return [Send("engineer", {"task": task}) for task in state["tasks"]]

    def engineer(state: dict) -> dict:
        code = coder.invoke({"task": state["task"]})
        return {"files": [{"task": state["task"], "code": code, "tests": tester.invoke({"code": code})}]}

    def review(state: TeamState) -> dict:
        work = "\n\n".join(f"## {f['task']}\nCode:\n{f['code']}\nTests:\n{f['tests']}" for f in state["files"])
        return {"review": reviewer.invoke({"work": work})}

    graph = StateGraph(TeamState)
    graph.add_node("engineer", engineer)
    graph.add_node("review", review)
    graph.add_conditional_edges(START, assign, ["engineer"])
    graph.add_edge("engineer", "review")
    graph.add_edge("review", END)
    return graph.compile()


if __name__ == "__main__":
    args = parse_args(__doc__.splitlines()[0], max_tokens=64)
    compare(build_graph, make_chat(args), {"tasks": TASKS}, output=lambda state: state["review"])
