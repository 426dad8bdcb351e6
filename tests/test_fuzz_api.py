"""Schema fuzzing: schemathesis generates requests from ``/openapi.json`` (valid ones and ones that break the
schema) for every operation and checks each answer with all its checks: never a server error, and every
status, content type, header and body as the document declares them. Against the real app on uvicorn, with
the scripted engine and Redis memory; once without keys and once with them (then it also checks that a
missing or wrong key is refused where the document says a key is needed).

Bounded and repeatable: a fixed seed, derandomised generation, at most EXAMPLES cases per operation and phase.

schemathesis's own runner (``schemathesis.engine``, what its command line runs) drives the phases (the
schema's examples, the coverage of each field's boundaries, then random generation) and the checks; its pytest
integration does not run under pytest 9. It calls the service synchronously, so it runs in a thread while
the event loop serves the app.
"""

from __future__ import annotations

import asyncio

import pytest
import schemathesis
from schemathesis.engine import events, from_schema

from agent.config import AgentConfig
from api.config import AuthConfig, RateConfig
from api.redis_memory import RedisMemory
from api.settings import Settings
from tests.agent_fixtures import app_with, client_for

KEY = "fuzzing-key"
EXAMPLES = 200  # per operation and phase: both runs take well under a minute on two cores

# Statuses a request the schema calls valid may still get, besides success: what a schema cannot say (the last
# OpenAI message must come from the user, an image must decode, a question must fit MEGREZ_API__MAX_MESSAGE_CHARS,
# an id must exist, a conversation may be busy).
ACCEPTED = ["2xx", "400", "401", "404", "409", "413", "429"]
REJECTED = ["400", "401", "404", "405", "413", "422", "429"]


def fuzz(url: str, document: dict, headers: dict[str, str]) -> list[str]:
    """Every check that failed, and every error of the run, as readable reports (empty: all passed)."""
    config = schemathesis.Config.from_dict(
        {
            "seed": 20260518,
            "base-url": url,
            "headers": headers,
            "request-timeout": 30,
            "generation": {"mode": "all", "max-examples": EXAMPLES, "deterministic": True, "database": "none"},
            "checks": {
                "positive_data_acceptance": {"expected-statuses": ACCEPTED},
                "negative_data_rejection": {"expected-statuses": REJECTED},
            },
        }
    )
    schema = schemathesis.openapi.from_dict(document, config=config)
    problems, operations = [], set()
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            operations.add(event.label)
            for checks in event.recorder.checks.values():
                for check in checks:
                    if (info := check.failure_info) is not None:
                        failure = info.failure
                        problems.append(
                            f"{event.label} [{event.phase.value}] {check.name}: {failure.title}\n"
                            f"{failure.message}\n{info.code_sample}"
                        )
        elif isinstance(event, events.NonFatalError | events.FatalError):
            problems.append(f"{getattr(event, 'label', 'run')}: {type(event.value).__name__}: {event.value}")
    assert len(operations) >= 12, f"schemathesis ran only {sorted(operations)}"
    return problems


@pytest.mark.parametrize("keys", [False, True], ids=["without keys", "with keys"])
async def test_every_operation_answers_as_documented(tokenizer_dir, corpus_backend, redis_url, keys):
    # No request rate and no wrong-key limit: the fuzzer sends many requests, some with wrong keys on purpose.
    auth = AuthConfig(api_keys=[KEY] if keys else [], wrong_keys="")
    settings = Settings(agent=AgentConfig(related=False), auth=auth, rate=RateConfig(requests=""))
    memory = RedisMemory(redis_url)
    app, _ = app_with(tokenizer_dir, corpus_backend, memory, settings=settings)
    try:
        async with client_for(app) as client:
            document = (await client.get("/openapi.json")).json()
            headers = {"Authorization": f"Bearer {KEY}"} if keys else {}
            problems = await asyncio.to_thread(fuzz, str(client.base_url), document, headers)
    finally:
        await memory.aclose()
    assert not problems, f"{len(problems)} failed checks:\n\n" + "\n\n".join(problems[:20])
