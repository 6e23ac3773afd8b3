"""The seed's content pipeline, in Python: research → blog post → social, email and SEO in parallel → review.

Workers and producers import this module (``ORCH_IMPORTS=examples.content_pipeline``) so both know the workflow, the
way both sides of Celery know a task. The same workflow as a file: ``examples/content_pipeline.yaml``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from orchestrator import LLMStep, PythonStep, StepContext, Workflow, function

# The offline provider's simulated latency, so the fan-out is visible in `orchestrator demo`.
DEMO_LATENCY = {"latency_s": 1.0}


class SeoMetadata(BaseModel):
    """Structured output of the SEO step."""

    title: str
    description: str
    keywords: list[str]


class ResearchStep(LLMStep):
    prompt: str = "Research the topic '{{ inputs.topic }}' for an audience of {{ inputs.audience }}. List key facts."
    max_tokens: int = 400


class BlogPostStep(LLMStep):
    prompt: str = "Write a blog post about {{ inputs.topic }} from this research:\n{{ steps.research.output.text }}"
    max_tokens: int = 900


class SocialPostsStep(LLMStep):
    prompt: str = "Write three social media posts promoting this blog post:\n{{ steps.blog_post.output.text }}"
    max_tokens: int = 200


class EmailNewsletterStep(LLMStep):
    prompt: str = "Write an email newsletter introducing this blog post:\n{{ steps.blog_post.output.text }}"
    max_tokens: int = 350


class SeoMetadataStep(LLMStep):
    prompt: str = "Write SEO metadata (title, description, keywords) for:\n{{ steps.blog_post.output.text }}"
    max_tokens: int = 200
    output_schema: type[BaseModel] | dict[str, Any] | None = SeoMetadata


@function("examples.content_pipeline.final_review")
def final_review(ctx: StepContext) -> dict[str, Any]:
    """Check the pieces fit together and assemble the package."""
    blog = ctx["blog_post"]
    seo = ctx["seo_metadata"]["data"]
    checks = {
        "blog_long_enough": blog["word_count"] >= 300,
        "social_present": bool(ctx["social_posts"]["text"]),
        "email_present": bool(ctx["email_newsletter"]["text"]),
        "seo_has_keywords": len(seo["keywords"]) > 0,
    }
    return {"approved": all(checks.values()), "checks": checks, "title": seo["title"], "words": blog["word_count"]}


def build(latency: dict[str, Any] | None = None, *, name: str = "content_pipeline", version: int = 1) -> Workflow:
    """The pipeline, with optional simulated LLM latency."""
    return Workflow(
        name,
        version=version,
        description="Research a topic, write a blog post, then social posts, a newsletter and SEO in parallel.",
        inputs={"topic": {"type": "string", "minLength": 1}, "audience": {"type": "string", "default": "developers"}},
        steps=[
            ResearchStep(name="research", simulate=latency),
            BlogPostStep(name="blog_post", depends_on=["research"], simulate=latency),
            SocialPostsStep(name="social_posts", depends_on=["blog_post"], simulate=latency),
            EmailNewsletterStep(name="email_newsletter", depends_on=["blog_post"], simulate=latency),
            SeoMetadataStep(name="seo_metadata", depends_on=["blog_post"], simulate=latency),
            PythonStep(
                name="final_review",
                fn=final_review,
                depends_on=["social_posts", "email_newsletter", "seo_metadata"],
            ),
        ],
    )


pipeline = build()
demo_pipeline = build(DEMO_LATENCY, name="content_pipeline_demo")
