"""Metering: estimate, reserve a hold, settle it at the exact usage, post it to the ledger.

Redis side: ``holds`` (Lua scripts in ``lua/``, over ``script_channel`` on the hot path);
Postgres side: ``posting`` (the settlement poster); between them the outbox record
(``outbox.SettlementRecord``). Prices: ``tokens``, ``estimate``, ``pricing``, ``rate_cards``.
"""
