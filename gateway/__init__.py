"""The OpenAI-compatible proxy: authenticate, price, hold, forward, relay, settle
(``create_app`` in ``gateway.app``); also the purchase routes and the Credits page."""
