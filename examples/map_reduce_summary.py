"""Map-reduce summary: a long report split into chunks, each summarised (map), the summaries combined (reduce).

    python examples/map_reduce_summary.py [--base-url URL] [--model smollm2] [--max-tokens 48]
"""

from __future__ import annotations

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import PromptTemplate
from langchain_core.runnables import Runnable, RunnableLambda
from langchain_text_splitters import RecursiveCharacterTextSplitter

from harness import DOCUMENT, compare, make_llm, parse_args

MAP_PROMPT = PromptTemplate.from_template(
    "Summarize this part of a harbour authority's annual report in one sentence. Name the ports and the "
    "figures it mentions.\n\nPart:\n{chunk}\n\nOne-sentence summary:"
)
REDUCE_PROMPT = PromptTemplate.from_template(
    "Here are summaries of the parts of an annual report:\n{summaries}\n\nWrite one short paragraph that "
    "summarises the whole report:"
)


def build_chain(llm, chunk_size: int = 900) -> Runnable:
    splitter = RecursiveCharacterTextSplitter(chunk_size=chunk_size, chunk_overlap=0)
    summarize = MAP_PROMPT | llm | StrOutputParser()
    return (
        RunnableLambda(splitter.split_text)
        | summarize.map()
        | RunnableLambda(lambda parts: {"summaries": "\n".join(f"- {p}" for p in parts)})
        | REDUCE_PROMPT | llm | StrOutputParser()
    )


if __name__ == "__main__":
    args = parse_args(__doc__.splitlines()[0], max_tokens=48)
    compare(build_chain, make_llm(args), DOCUMENT)
