"""Map-reduce summary, as LangChain's documentation teaches it: a LangGraph graph that sends each part of a long
report to a map node (`Send`), each summarised by `ChatPromptTemplate | ChatParrot`, and a reduce node that writes
the summary from the parts' notes.

    python examples/map_reduce_summary.py [--base-url URL] [--model smollm2] [--max-tokens 40]
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

# An example of the task before the real one: a small model follows an example far better than an instruction.
# The map calls all begin with these messages, so the server fills them once and forks them for every part.
MAP_PROMPT = ChatPromptTemplate.from_messages([
    ("system", "Summarize the paragraph in one short sentence. Keep its place names and its most important number."),
    ("human", "Dalby is the busiest of the region's three airports. Last year it handled 52,000 flights, four "
              "percent more than the year before, most of them short flights to the capital. The old terminal is "
              "too small."),
    ("ai", "Dalby, the busiest airport, handled 52,000 flights, four percent more than the year before."),
    ("human", "{part}"),
])
REDUCE_PROMPT = ChatPromptTemplate.from_messages([
    ("human", "Rewrite these notes on an annual report as one short paragraph:\n{notes}"),
])


class SummaryState(TypedDict):
    parts: list[str]
    notes: Annotated[list[str], operator.add]  # the map nodes' notes (LangGraph applies them in the order of the sends)
    summary: str


def build_graph(chat, reduce_tokens: int = 120) -> CompiledStateGraph:
    summarize = MAP_PROMPT | chat.bind(stop=["\n"]) | StrOutputParser()
    reduce = REDUCE_PROMPT | chat.bind(max_tokens=reduce_tokens) | StrOutputParser()

    def split(state: SummaryState) -> list[Send]:
        return [Send("map", {"part": part}) for part in state["parts"]]

    def map_part(state: dict) -> dict:
        return {"notes": [summarize.invoke({"part": state["part"]})]}

    def reduce_notes(state: SummaryState) -> dict:
        notes = "\n".join(f"- {note.strip()}" for note in state["notes"])
        return {"summary": reduce.invoke({"notes": notes}).strip()}

    graph = StateGraph(SummaryState)
    graph.add_node("map", map_part)
    graph.add_node("reduce", reduce_notes)
    graph.add_conditional_edges(START, split, ["map"])
    graph.add_edge("map", "reduce")
    graph.add_edge("reduce", END)
    return graph.compile()


def report_parts(document: str, chunk_size: int = 1000) -> dict:
    return {"parts": RecursiveCharacterTextSplitter(chunk_size=chunk_size, chunk_overlap=0).split_text(document)}


if __name__ == "__main__":
    args = parse_args(__doc__.splitlines()[0], max_tokens=40)
    compare(build_graph, make_chat(args), report_parts(DOCUMENT), output=lambda state: state["summary"])
