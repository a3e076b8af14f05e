"""Schemathesis against the served OpenAPI document: every operation of the admin API,
including those other modules add, answers no 5xx and only what the document describes
(status codes, content type, headers, body schema), and refuses what its schemas forbid.

Schemathesis's own command line (``st run``) runs against the admin app on a loopback port,
with its examples, coverage (boundary values: limits 0, 1, 200, 201, the largest bigint...)
and fuzzing phases; bounded (``--max-examples``) and reproducible (``--seed``).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from admin_api.openapi import OPENAPI_PATH
from billing.admin_tokens import Role
from tests.admin_api.conftest import AdminApi

MAX_EXAMPLES = 25
SEED = 20261203
CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
        "negative_data_rejection",
    ]
)
SCHEMATHESIS = Path(sys.executable).with_name("st")


async def test_admin_api_conforms_to_its_openapi_document(admin_api: AdminApi, tmp_path: Path):
    # The fuzz token's id is far above the small ids the generated revokes and patches aim
    # at, so the run cannot lock itself out.
    await admin_api.pool.execute("SELECT setval('admin_tokens_id_seq', 7000000000000)")
    token, _ = await admin_api.mint(Role.ADMIN, name="fuzz")
    base_url = str(admin_api.client.make_url(""))
    process = await asyncio.create_subprocess_exec(
        str(SCHEMATHESIS),
        "run",
        base_url.rstrip("/") + OPENAPI_PATH,
        "--checks",
        CHECKS,
        "--phases",
        "examples,coverage,fuzzing",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--seed",
        str(SEED),
        "--workers",
        "1",
        "--generation-database",
        "none",
        "--header",
        f"Authorization: Bearer {token}",
        "--no-color",
        # Its crash cache (replayed first by the next run) stays out of the checkout: each run
        # starts from the seed alone.
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await process.communicate()
    report = output.decode(errors="replace")
    assert process.returncode == 0, report
    assert "No issues found" in report or "passed" in report, report
