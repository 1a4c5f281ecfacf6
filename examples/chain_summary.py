"""Chain (refine) summary: each step reads the next chunk of the report and the summary so far.

    python examples/chain_summary.py [--base-url URL] [--model smollm2] [--max-tokens 48]
"""

from __future__ import annotations

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import PromptTemplate
from langchain_core.runnables import Runnable, RunnableLambda
from langchain_text_splitters import RecursiveCharacterTextSplitter

from harness import DOCUMENT, compare, make_llm, parse_args

REFINE_PROMPT = PromptTemplate.from_template(
    "Summary so far: {summary}\n\nNext part of the report:\n{chunk}\n\nRewrite the summary in two sentences so "
    "that it also covers the new part:"
)


def build_chain(llm, chunk_size: int = 1200, steps: int | None = None) -> Runnable:
    chunks = RecursiveCharacterTextSplitter(chunk_size=chunk_size, chunk_overlap=0).split_text(DOCUMENT)
    chunks = chunks[:steps] if steps else chunks
    refine = REFINE_PROMPT | llm | StrOutputParser()
    chain: Runnable = RunnableLambda(lambda first: {"summary": "(none yet)", "chunk": first})
    for following in chunks[1:] + [None]:
        chain = chain | refine
        if following is not None:
            chain = chain | RunnableLambda(lambda summary, chunk=following: {"summary": summary, "chunk": chunk})
    return RunnableLambda(lambda _: chunks[0]) | chain


if __name__ == "__main__":
    args = parse_args(__doc__.splitlines()[0], max_tokens=48)
    compare(build_chain, make_llm(args), DOCUMENT)
