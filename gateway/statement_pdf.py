"""A monthly statement as a PDF (fpdf2, its core Helvetica font: nothing to ship or fetch).

Amounts are ``billing.units.credits_text`` (exact, 3 decimals), the same text as the CSV
statement; the layout is one page per 40-odd models of usage, which fpdf2 breaks itself.
"""

from __future__ import annotations

from fpdf import FPDF
from fpdf.enums import XPos, YPos

from billing.statements import Statement
from billing.units import credits_text

_LABEL_MM = 110
_AMOUNT_MM = 60
_USAGE_COLUMNS_MM = (52, 20, 30, 30, 30, 28)


def _latin1(text: str) -> str:
    """Core PDF fonts cover Latin-1 only; anything else (an email's Unicode) shows as ``?``."""
    return text.encode("latin-1", "replace").decode("latin-1")


def _line(pdf: FPDF, width: float, height: float, text: str, align: str = "L") -> None:
    """A cell that ends its line (the next cell starts at the left margin below)."""
    pdf.cell(width, height, text, align=align, new_x=XPos.LMARGIN, new_y=YPos.NEXT)


def _summary(pdf: FPDF, statement: Statement) -> None:
    pdf.set_font("Helvetica", "B", 12)
    _line(pdf, 0, 8, "Summary (credits)")
    for label, amount in statement.summary_lines():
        bold = label in ("Opening balance", "Closing balance")
        pdf.set_font("Helvetica", "B" if bold else "", 10)
        pdf.cell(_LABEL_MM, 6, label)
        _line(pdf, _AMOUNT_MM, 6, credits_text(amount), "R")


def _usage(pdf: FPDF, statement: Statement) -> None:
    pdf.set_font("Helvetica", "B", 12)
    _line(pdf, 0, 8, "Usage by model")
    header = ("Model", "Requests", "Input tokens", "Cached input", "Output tokens", "Credits")
    pdf.set_font("Helvetica", "B", 9)
    for width, title in zip(_USAGE_COLUMNS_MM, header, strict=True):
        pdf.cell(width, 6, title, align="L" if title == "Model" else "R")
    pdf.ln()
    pdf.set_font("Helvetica", "", 9)
    if not statement.usage:
        _line(pdf, 0, 6, "No usage this month.")
    for usage in statement.usage:
        cells = (
            _latin1(usage.model),
            f"{usage.requests:,}",
            f"{usage.input_tokens:,}",
            f"{usage.cached_input_tokens:,}",
            f"{usage.output_tokens:,}",
            credits_text(usage.charged_millicredits),
        )
        for index, (width, text) in enumerate(zip(_USAGE_COLUMNS_MM, cells, strict=True)):
            pdf.cell(width, 6, text, align="L" if index == 0 else "R")
        pdf.ln()


def statement_pdf(statement: Statement, *, compress: bool = True) -> bytes:
    """The statement as PDF bytes (``compress=False`` leaves the page text readable in the
    bytes, for tests)."""
    pdf = FPDF(format="A4")
    pdf.compress = compress
    pdf.set_title(f"Statement {statement.label}")
    pdf.set_creator("creditgate")
    pdf.add_page()
    pdf.set_font("Helvetica", "B", 16)
    _line(pdf, 0, 10, f"Credits statement {statement.label}")
    pdf.set_font("Helvetica", "", 10)
    period = f"{statement.period_start:%Y-%m-%d %H:%M} to {statement.period_end:%Y-%m-%d %H:%M} UTC"
    _line(pdf, 0, 6, f"Account {statement.account_id}: {_latin1(statement.email)}")
    _line(pdf, 0, 6, f"Period: {period}")
    _line(pdf, 0, 6, "1,000 credits = $1.00. Amounts are exact to 0.001 credit.")
    pdf.ln(4)
    _summary(pdf, statement)
    pdf.ln(4)
    _usage(pdf, statement)
    return bytes(pdf.output())
