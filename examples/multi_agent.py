"""Multi-agent coding: for several files a coder writes the code and a tester its tests (each consuming the
coder's output); a reviewer then reads all of it.

    python examples/multi_agent.py [--base-url URL] [--model smollm2] [--max-tokens 64]
"""

from __future__ import annotations

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import PromptTemplate
from langchain_core.runnables import Runnable, RunnableLambda, RunnablePassthrough

from harness import compare, make_llm, parse_args

TASKS = [
    "a function `is_leap_year(year)` that follows the Gregorian rules",
    "a function `word_count(text)` that returns a dict from each lowercase word to its count",
    "a function `celsius_to_fahrenheit(c)` that rounds to one decimal",
]
CODER = PromptTemplate.from_template("You are a senior Python programmer. Write {task}. Only the code.\n\n```python\n")
TESTER = PromptTemplate.from_template(
    "You are a tester. Write pytest tests for this code:\n```python\n{code}\n```\nOnly the tests.\n\n```python\n"
)
REVIEWER = PromptTemplate.from_template(
    "You are a code reviewer. Here is the team's work:\n{work}\n\nList the three most important problems:"
)


def build_chain(llm) -> Runnable:
    per_file = (
        RunnablePassthrough.assign(code=CODER | llm | StrOutputParser())
        | RunnablePassthrough.assign(tests=TESTER | llm | StrOutputParser())
    )

    def gather(files: list[dict]) -> dict:
        parts = [f"## {f['task']}\nCode:\n{f['code']}\nTests:\n{f['tests']}" for f in files]
        return {"work": "\n\n".join(parts)}

    return (
        RunnableLambda(lambda tasks: [{"task": t} for t in tasks])
        | per_file.map()
        | RunnableLambda(gather)
        | REVIEWER | llm | StrOutputParser()
    )


if __name__ == "__main__":
    args = parse_args(__doc__.splitlines()[0], max_tokens=64)
    compare(build_chain, make_llm(args), TASKS)
