"""The long-form article of ``examples/long_form_article.yaml``, in Python: its shape is decided while it runs.

outline → one section per outline item, in parallel (``for_each``) → an editor loop that critiques and revises until
approved, at most 3 times (``repeat``) → the article on two channels, each a child run (:class:`WorkflowStep`).
Producers and workers import this module (``ORCH_IMPORTS=examples.long_form_article``).
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from orchestrator import LLMStep, NoopStep, Workflow, WorkflowStep


class Outline(BaseModel):
    """The outline step's structured output: the section titles."""

    sections: list[str] = Field(
        json_schema_extra={"examples": [["Why it matters", "How it works", "Pitfalls", "Where to go next"]]}
    )


class Edit(BaseModel):
    """One pass of the editor: the draft, its critique, and whether it is ready."""

    draft: str
    critique: str
    approved: bool


channel_post = Workflow(
    "channel_post",
    version=1,
    inputs={"channel": {"type": "string"}, "text": {"type": "string"}},
    steps=[
        LLMStep(name="adapt", prompt="Adapt this article for {{ inputs.channel }}: {{ inputs.text }}", max_tokens=400),
        NoopStep(name="post", depends_on=["adapt"]),
    ],
)

EDIT_PROMPT = (
    "{% if previous %}Revise this draft after your critique: {{ previous.data.draft }}{% else %}Edit into one "
    "article: {% for section in steps.sections.output %}{{ section.text }} {% endfor %}{% endif %}"
    " Say whether it is ready to publish (iteration {{ iteration }})."
)

long_form_article = Workflow(
    "long_form_article",
    version=1,
    inputs={"topic": {"type": "string"}},
    budget_usd=1.00,
    steps=[
        LLMStep(
            name="outline",
            prompt="Outline a long-form article about {{ inputs.topic }}: four section titles.",
            max_tokens=300,
            output_schema=Outline,
        ),
        LLMStep(
            name="sections",
            depends_on=["outline"],
            for_each=lambda ctx: ctx["outline"]["data"]["sections"],
            max_parallel=4,
            prompt=(
                "Write section {{ index + 1 }} of {{ count }} of an article about {{ inputs.topic }},"
                ' titled "{{ item }}".'
            ),
            max_tokens=600,
        ),
        LLMStep(
            name="edit",
            depends_on=["sections"],
            repeat={"until": "output.data.approved", "max_iterations": 3},
            prompt=EDIT_PROMPT,
            max_tokens=1200,
            output_schema=Edit,
        ),
        *(
            WorkflowStep(
                name=f"publish_{channel}",
                depends_on=["edit"],
                workflow=channel_post,
                inputs={"channel": channel, "text": "{{ steps.edit.output.data.draft }}"},
            )
            for channel in ("blog", "email")
        ),
    ],
)
