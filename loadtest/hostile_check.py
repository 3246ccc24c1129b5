"""Checking a server's answers to the hostile corpus (:mod:`loadtest.hostile_corpus`): the
upload of one file, what is wrong with an answer, and every file posted to a running server."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from loadtest.bodies import multipart
from loadtest.hostile_corpus import CORPUS, HostileFile

#: The multipart boundary of every upload (checked not to occur in a file's bytes).
BOUNDARY = "pathguard-hostile-corpus-7c0b5e2a9d41"


def upload(item: HostileFile, data: bytes) -> tuple[bytes, str]:
    """(body, Content-Type header) of a multipart/form-data request with ``data`` as the field
    ``file``, built by hand so that the file name may be any bytes."""
    return multipart([("file", item.upload_name, data, item.content_type)], BOUNDARY)


def problems(item: HostileFile, status: int, body: Any) -> list[str]:
    """What is wrong with the answer ``status`` / ``body`` (parsed JSON) to ``item``."""
    if status != item.status:
        return [f"status {status}, expected {item.status}: {body}"]
    found = []
    if status >= 400:
        if not isinstance(body, dict):
            return [f"error body is not a JSON object: {body!r}"]
        if body.get("code") != item.code:
            found.append(f"code {body.get('code')!r}, expected {item.code!r}")
        message = str(body.get("error", ""))
        if item.words not in message:
            found.append(f"message {message!r} lacks {item.words!r}")
        if "<script>" in message:
            found.append("the message echoes the upload")
    else:
        report = body.get("input", {})
        for key, value in item.input.items():
            if report.get(key) != value:
                found.append(f"input.{key} = {report.get(key)!r}, expected {value!r}")
        changed = report.get("resized") or report.get("converted") or report.get("lossy")
        if bool(report.get("note")) != bool(changed):
            found.append(f"input.note {report.get('note')!r} does not match the flags")
        score = body.get("adversarial", {}).get("score")
        if not (isinstance(score, float) and 0.0 <= score <= 1.0):
            found.append(f"adversarial.score {score!r} not in [0, 1]")
    return found


@dataclass(frozen=True)
class Answer:
    """What a server answered to one corpus file: its status and what is wrong (nothing: as
    expected)."""

    item: HostileFile
    status: int
    problems: tuple[str, ...]


@dataclass(frozen=True)
class ServerCheck:
    """Every corpus file's answer, and the status of ``/v2/health/ready`` after them all."""

    answers: tuple[Answer, ...]
    ready_status: int

    @property
    def failures(self) -> int:
        """Files answered otherwise than expected."""
        return sum(bool(a.problems) for a in self.answers)

    @property
    def passed(self) -> bool:
        return self.failures == 0 and self.ready_status == 200


def check_server(url: str, api_key: str | None = None,
                 on_answer: Callable[[Answer], None] | None = None) -> ServerCheck:
    """Post every file of the corpus to ``url``/classify (with ``X-API-Key: api_key`` if
    given), then ask ``/v2/health/ready``; ``on_answer`` sees each answer as it comes."""
    headers = {} if api_key is None else {"X-API-Key": api_key}
    answers = []
    with httpx.Client(base_url=url, timeout=60.0, headers=headers) as client:
        for item in CORPUS:
            body, content_type = upload(item, item.make())
            r = client.post("/classify", content=body, headers={"Content-Type": content_type})
            try:
                parsed = r.json()
            except ValueError:
                parsed = r.text
            answers.append(Answer(item, r.status_code, tuple(problems(item, r.status_code,
                                                                      parsed))))
            if on_answer is not None:
                on_answer(answers[-1])
        ready = client.get("/v2/health/ready").status_code
    return ServerCheck(tuple(answers), ready)
