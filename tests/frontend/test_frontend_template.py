"""The template parser of semantic functions: the pieces it produces, escapes, and each error with its position."""

import pytest

from parrot_lc.frontend import Output, SemanticFunction, semantic_function
from parrot_lc.frontend.template import Placeholder, Template, TemplateError, Text, parse_template


def test_pieces_of_a_template_with_inputs_and_outputs():
    template = parse_template("Report: {{input:report}}\nSummary: {{output:summary}} Title: {{ output : title }}.")
    assert template.pieces == (
        Text("Report: "),
        Placeholder("input", "report", 8),
        Text("\nSummary: "),
        Placeholder("output", "summary", 34),
        Text(" Title: "),
        Placeholder("output", "title", 60),
        Text("."),
    )
    assert template.inputs == ("report",) and template.outputs == ("summary", "title")


def test_an_input_may_repeat_and_may_follow_an_output():
    template = parse_template("{{input:a}} {{output:b}} again {{input:a}}")
    assert template.inputs == ("a",) and template.outputs == ("b",)
    assert [p.kind for p in template.placeholders] == ["input", "output", "input"]


def test_single_braces_are_text_and_backslash_escapes_double_braces():
    source = 'JSON {"a": {"b": 1\\}} and \\{{x\\}} then {{{input:v}}} {{output:o}}'
    assert parse_template(source).pieces == (
        Text('JSON {"a": {"b": 1}} and {{x}} then {'),
        Placeholder("input", "v", source.index("{{input")),
        Text("} "),
        Placeholder("output", "o", source.index("{{output")),
    )


@pytest.mark.parametrize(
    "source, position, words",
    [
        ("Hi {{input:x}} {{output:y", 15, "not closed"),
        ("Hi {{input:x {{output:y}}", 3, "not closed"),
        ("Hi }} {{output:y}}", 3, "closes no placeholder"),
        ('{"a": {"b": 1}} {{output:y}}', 13, "closes no placeholder"),
        ("{{output:y}} {{inptu:x}}", 13, "unknown placeholder kind 'inptu'"),
        ("{{output:y}} {{x}}", 13, "has no kind"),
        ("{{output:y}} {{input: }}", 13, "empty name"),
        ("{{output:y}} {{input:two words}}", 13, "invalid input name"),
        ("{{output:y}} and {{output:y}}", 17, "output 'y' appears twice"),
        ("{{output:y}} then {{input:y}}", 18, "output 'y' is used as an input"),
        ("{{input:y}} then {{output:y}}", 17, "'y' is an input (at position 0) and an output"),
        ("No output: {{input:x}}", 22, "no {{output:NAME}}"),
        ("", 0, "no {{output:NAME}}"),
    ],
)
def test_each_error_names_its_position(source, position, words):
    with pytest.raises(TemplateError) as info:
        parse_template(source)
    assert info.value.position == position and words in info.value.message
    assert isinstance(info.value, ValueError) and f"position {position}" in str(info.value)


def test_declared_parameters_must_match_the_placeholders():
    with pytest.raises(TemplateError, match="'z' is not a parameter") as info:
        parse_template("{{input:x}} {{input:z}} {{output:y}}", ["x", "y"])
    assert info.value.position == 12
    with pytest.raises(TemplateError, match="parameter 'w' does not appear") as info:
        parse_template("{{input:x}} {{output:y}}", ["x", "y", "w"])
    assert info.value.position == 24


def test_template_errors_surface_when_a_semantic_function_is_declared():
    with pytest.raises(TemplateError, match="unknown placeholder kind") as info:
        SemanticFunction.from_template("Say {{inptu:x}} {{output:y}}")
    assert info.value.position == 4

    with pytest.raises(TemplateError, match="'topic' is not a parameter") as info:
        @semantic_function
        def essay(subject: str, text: Output):
            """Write about {{input:topic}}: {{output:text}}"""
    assert info.value.position == 12  # in the dedented docstring

    with pytest.raises(TemplateError, match="annotated as an output"):
        @semantic_function
        def echo(text: Output, copy: Output):
            """{{input:text}} {{output:copy}}"""


def test_sampling_settings_per_output():
    # Shared keywords, then an output's annotation, then its own keyword.
    @semantic_function(max_tokens=16, temperature=0.0, title={"max_tokens": 4, "stop": "\n"})
    def write(topic: str, title: Output(max_tokens=8, top_k=5), body: Output(max_tokens=64)):
        """Topic: {{input:topic}}
        Title: {{output:title}}
        Body: {{output:body}}"""

    assert write.sampling == {"title": {"max_tokens": 4, "temperature": 0.0, "top_k": 5, "stop": ["\n"]},
                              "body": {"max_tokens": 64, "temperature": 0.0}}
    assert write.template.source == "Topic: {{input:topic}}\nTitle: {{output:title}}\nBody: {{output:body}}"
    with pytest.raises(TypeError, match="unknown sampling setting 'max_token'"):
        SemanticFunction.from_template("{{output:y}}", max_token=3)
    with pytest.raises(TypeError, match="not an output"):
        SemanticFunction.from_template("{{output:y}}", z={"max_tokens": 3})


def test_a_template_of_pieces_keeps_adjacent_texts_apart_and_is_checked_like_a_parsed_one():
    template = Template.of([Text("Shared {{prefix}}. "), Text(""), Text("Rest "), Placeholder("input", "x"),
                            Placeholder("output", "y")])
    assert template.pieces == (Text("Shared {{prefix}}. "), Text("Rest "),
                               Placeholder("input", "x", 26), Placeholder("output", "y", 37))
    assert template.source == "Shared \\{{prefix\\}}. Rest {{input:x}}{{output:y}}"
    assert parse_template(template.source).placeholders == template.placeholders
    assert SemanticFunction.from_template(template).template is template
    with pytest.raises(TemplateError, match="no {{output:NAME}}"):
        Template.of([Text("no output")])
    with pytest.raises(TemplateError, match="output 'y' is used as an input"):
        Template.of([Placeholder("output", "y"), Placeholder("input", "y")])
