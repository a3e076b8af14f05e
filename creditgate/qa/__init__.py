"""``creditgate qa``: the go-live QA script, an HTTP client of a deployed gateway and its admin
service (docs/qa.md).

It creates its own throwaway accounts through the admin API (``qa+<run id>@creditgate.invalid``),
runs one section per item of the owners' QA checklist and prints pass, fail or skip per section
(``--json``: one JSON report); exit status 1 when a section fails. The accounts are suspended at
the end, never deleted (they are real rows of a real ledger).

The charges are recomputed here from the usage the upstream reported and each usage row's rate
snapshot, with integer arithmetic written from docs/design.md ("Units and arithmetic"), not with
``billing.metering.pricing``: the script is the independent check of that code.

The full run publishes a slightly higher rate card for ``--rate-model`` for a moment, and the
original rates back (use it in staging); ``--smoke`` (the runbook's T-0 check) never does: one
call, one 402, and a purchase only when the gateway's Stripe is the simulated one.
"""

from __future__ import annotations

from creditgate.qa.charges import credits_to_mc, expected_charge_mc, mc_to_credits
from creditgate.qa.client import Options
from creditgate.qa.report import summary_text
from creditgate.qa.run import run_qa

__all__ = [
    "Options",
    "credits_to_mc",
    "expected_charge_mc",
    "mc_to_credits",
    "run_qa",
    "summary_text",
]
