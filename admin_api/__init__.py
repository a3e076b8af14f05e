"""The admin service on ``ADMIN_PORT``: health and the signed Stripe webhook
(``create_admin_app`` in ``admin_api.app``)."""
