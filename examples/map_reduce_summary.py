"""Map-reduce summary, as LangChain's documentation teaches it: a LangGraph graph that sends each part of a long
report to a map node (`Send`), each summarised by `ChatPromptTemplate | ChatParrot`, and a reduce node that writes
the summary from the parts' notes.

    python examples/map_reduce_summary.py [--base-url URL] [--model smollm2] [--max-tokens 60]
"""

from __future__ import annotations

import operator
from typing import Annotated, TypedDict

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_text_splitters import RecursiveCharacterTextSplitter
from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.types import Send

from harness import DOCUMENT, compare, make_chat, parse_args

# Prompts for a small model (the default has 135M parameters): each part is short and gets one sentence, and the
# reduce call writes only the summary's opening sentence, the notes following it as its points. Asked to rewrite all
# the notes as one paragraph, such a model mixes up the ports' figures or repeats itself; asked to copy an example's
# form (few-shot), it copies the example's content into parts that do not match it.
# The map calls all begin with the same instruction, so the server fills it once and forks it for every part.
MAP_PROMPT = ChatPromptTemplate.from_messages([("human", "Summarize this text in one sentence.\n\n{part}")])
REDUCE_PROMPT = ChatPromptTemplate.from_messages([
    ("human", "Notes on a report:\n{notes}\n\nWrite one sentence that says what the report is about."),
])


class SummaryState(TypedDict):
    parts: list[str]
    notes: Annotated[list[str], operator.add]  # the map nodes' notes (LangGraph applies them in the order of the sends)
    summary: str


def build_graph(chat) -> CompiledStateGraph:
    summarize = MAP_PROMPT | chat.bind(stop=["\n"]) | StrOutputParser()
    introduce = REDUCE_PROMPT | chat.bind(stop=["\n"]) | StrOutputParser()

    def split(state: SummaryState) -> list[Send]:
        return [Send("map", {"part": part}) for part in state["parts"]]

    def map_part(state: dict) -> dict:
        return {"notes": [summarize.invoke({"part": state["part"]})]}

    def reduce_notes(state: SummaryState) -> dict:
        notes = "\n".join(f"- {note.strip()}" for note in state["notes"])
        return {"summary": f"{introduce.invoke({'notes': notes}).strip()}\n{notes}"}

    graph = StateGraph(SummaryState)
    graph.add_node("map", map_part)
    graph.add_node("reduce", reduce_notes)
    graph.add_conditional_edges(START, split, ["map"])
    graph.add_edge("map", "reduce")
    graph.add_edge("reduce", END)
    return graph.compile()


def report_parts(document: str, chunk_size: int = 400) -> dict:
    return {"parts": RecursiveCharacterTextSplitter(chunk_size=chunk_size, chunk_overlap=0).split_text(document)}


if __name__ == "__main__":
    args = parse_args(__doc__.splitlines()[0], max_tokens=60)
    compare(build_graph, make_chat(args), report_parts(DOCUMENT), output=lambda state: state["summary"])
