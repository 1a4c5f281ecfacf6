"""Chain (refine) summary: each step reads the next chunk of the report and the summary so far.

    python examples/chain_summary.py [--base-url URL] [--model smollm2] [--max-tokens 48]
"""

from __future__ import annotations

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import PromptTemplate
from langchain_core.runnables import Runnable, RunnableLambda, RunnablePassthrough
from langchain_text_splitters import RecursiveCharacterTextSplitter

from harness import DOCUMENT, compare, make_llm, parse_args

REFINE_PROMPT = PromptTemplate.from_template(
    "Summary so far: {summary}\n\nNext part of the report:\n{chunk}\n\nRewrite the summary in two sentences so "
    "that it also covers the new part:"
)


def build_chain(llm, chunk_size: int = 1200, steps: int | None = None) -> Runnable:
    """A refine chain over the document it is given: one step per part, as many steps as the report has parts
    (or `steps`), fixed when the chain is built, as a LangChain refine chain's are."""
    splitter = RecursiveCharacterTextSplitter(chunk_size=chunk_size, chunk_overlap=0)
    count = steps or len(splitter.split_text(DOCUMENT))
    refine = REFINE_PROMPT | llm | StrOutputParser()
    chain: Runnable = RunnableLambda(lambda document: {"summary": "(none yet)", "chunks": splitter.split_text(document)})
    for i in range(count):
        step = RunnableLambda(lambda state, i=i: {"summary": state["summary"], "chunk": state["chunks"][i]}) | refine
        chain = chain | RunnablePassthrough.assign(summary=step)
    return chain | RunnableLambda(lambda state: state["summary"].strip())


if __name__ == "__main__":
    args = parse_args(__doc__.splitlines()[0], max_tokens=48)
    compare(build_chain, make_llm(args), DOCUMENT)
