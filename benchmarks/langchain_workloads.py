"""The end-to-end workloads written as LangChain users write them (`e2e.py --client langchain`): map-reduce and the
multi-agent team as LangGraph graphs (fan-outs by `Send`, nodes that call `prompt | ChatParrot | parser`), chats
as `ChatPromptTemplate | ChatParrot` streamed. In parrot mode the graphs run under `deferred` (their calls reach
the server as graphs of Semantic Variables); the baselines run the same code eagerly, each call a request.

The sizes and texts are those of `workloads.Driver`, so that the speedups read against the frontend-driven ones of
the same workloads."""

from __future__ import annotations

import operator
import time
from typing import Annotated, Any, TypedDict

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langgraph.graph import END, START, StateGraph
from langgraph.types import Send

from parrot_lc import ChatParrot
from parrot_lc.integrations.langchain import deferred
from workloads import MAP_INSTRUCTION, REDUCE_INSTRUCTION, Driver


class MapReduceState(TypedDict):
    chunks: list[str]
    summaries: Annotated[list[str], operator.add]
    final: str


class TeamState(TypedDict):
    task: str
    specs: list[str]
    design: str
    codes: Annotated[list[tuple[int, str]], operator.add]
    codebase: str
    revised: Annotated[list[str], operator.add]


class LangChainDriver(Driver):
    """`Driver`'s workloads through ChatParrot and LangGraph: deferred in parrot mode, eager in the baselines."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Greedy and every call to its max_tokens, as the frontend-driven workloads run.
        self.chat_model = ChatParrot(base_url=self.server.base_url, model=self.model, temperature=0, ignore_eos=True,
                                     timeout=3600)

    def _chain(self, prompt: ChatPromptTemplate, max_tokens: int):
        return prompt | self.chat_model.bind(max_tokens=max_tokens) | StrOutputParser()

    async def _run(self, graph, state: dict[str, Any]) -> dict[str, Any]:
        """The compiled graph run as the mode runs applications: deferred (one graph of calls) or eagerly."""
        return await (deferred(graph) if self.parrot else graph).ainvoke(state)

    async def chat(self, system: str, user: str, max_tokens: int) -> dict[str, float]:
        """A chatbot's turn: the app's system prompt and the user's question, streamed."""
        chain = ChatPromptTemplate.from_messages([("system", "{system}"), ("human", "{question}")]) | \
            self.chat_model.bind(max_tokens=max_tokens)
        start = time.perf_counter()
        first = None
        async for _ in chain.astream({"system": system, "question": user}):
            first = first or time.perf_counter()
        end = time.perf_counter()
        per_token = (end - first) / max(1, max_tokens - 1) if first else float("nan")
        return {"latency_s": end - start, "first_token_s": (first or end) - start, "per_token_s": per_token}

    async def map_reduce_once(self, chunks: list[str], criterion: str = "latency") -> float:
        """LangChain's map-reduce summary as a LangGraph graph: a `Send` for each chunk, then the reduce node."""
        s = self.scale
        summarize = self._chain(ChatPromptTemplate.from_messages(
            [("system", MAP_INSTRUCTION), ("human", "Part: {chunk}\nSummary:")]), s.summary_tokens)
        combine = self._chain(ChatPromptTemplate.from_messages(
            [("system", REDUCE_INSTRUCTION), ("human", "{summaries}\nSummary:")]), s.summary_tokens)

        async def summarize_node(state: dict[str, str]) -> dict[str, list[str]]:
            return {"summaries": [await summarize.ainvoke({"chunk": state["chunk"]})]}

        async def reduce_node(state: MapReduceState) -> dict[str, str]:
            return {"final": await combine.ainvoke({"summaries": "\n".join(f"- {p}" for p in state["summaries"])})}

        graph = StateGraph(MapReduceState)
        graph.add_node("summarize", summarize_node)
        graph.add_node("reduce", reduce_node)
        graph.add_conditional_edges(START, lambda state: [Send("summarize", {"chunk": c}) for c in state["chunks"]],
                                    ["summarize"])
        graph.add_edge("summarize", "reduce")
        graph.add_edge("reduce", END)
        start = time.perf_counter()
        await self._run(graph.compile(), {"chunks": chunks})
        return time.perf_counter() - start

    async def _agents(self, architect_role: str, engineer_role: str, reviewer_role: str, task: str,
                      specs: list[str]) -> None:
        """The software team as a LangGraph graph: the architect, an engineer per file (`Send`), then a reviewer and
        the engineer's revision per file, over the codebase the engineers wrote."""
        s = self.scale
        design_chain = self._chain(ChatPromptTemplate.from_messages(
            [("system", architect_role), ("human", "Task: {task}\nDesign:")]), s.design_tokens)
        code_chain = self._chain(ChatPromptTemplate.from_messages(
            [("system", engineer_role), ("human", "Design: {design}\nFile: {spec}\nCode:")]), s.code_tokens)
        review_chain = self._chain(ChatPromptTemplate.from_messages(
            [("system", reviewer_role), ("human", "Design: {design}{codebase}\nReview file {name}:")]),
            s.review_tokens)
        revise_chain = self._chain(ChatPromptTemplate.from_messages(
            [("system", engineer_role),
             ("human", "Design: {design}{codebase}\nReview of file {name}: {review}\nRevised code:")]), s.code_tokens)

        async def architect(state: TeamState) -> dict[str, str]:
            return {"design": await design_chain.ainvoke({"task": state["task"]})}

        async def engineer(state: dict[str, Any]) -> dict[str, list[tuple[int, str]]]:
            code = await code_chain.ainvoke({"design": state["design"], "spec": state["spec"]})
            return {"codes": [(state["index"], code)]}

        def gather(state: TeamState) -> dict[str, str]:
            return {"codebase": "\nCodebase:" + "".join(f"\nFile {i}:\n{code}" for i, code in sorted(state["codes"]))}

        async def review_and_revise(state: dict[str, Any]) -> dict[str, list[str]]:
            inputs = {"design": state["design"], "codebase": state["codebase"], "name": str(state["index"])}
            review = await review_chain.ainvoke(inputs)
            return {"revised": [await revise_chain.ainvoke({**inputs, "review": review})]}

        graph = StateGraph(TeamState)
        for name, node in [("architect", architect), ("engineer", engineer), ("gather", gather),
                           ("review_and_revise", review_and_revise)]:
            graph.add_node(name, node)
        graph.add_edge(START, "architect")
        graph.add_conditional_edges("architect", lambda state: [
            Send("engineer", {"design": state["design"], "spec": spec, "index": i})
            for i, spec in enumerate(state["specs"])], ["engineer"])
        graph.add_edge("engineer", "gather")
        graph.add_conditional_edges("gather", lambda state: [
            Send("review_and_revise", {"design": state["design"], "codebase": state["codebase"], "index": i})
            for i in range(len(state["specs"]))], ["review_and_revise"])
        graph.add_edge("review_and_revise", END)
        await self._run(graph.compile(), {"task": task, "specs": specs})

