"""What both services run on: settings (the only reader of the environment), resources
(Postgres pool, Redis client and hold scripts, Stripe client, each in a ``cleanup_ctx``), the
shared ``AppKey``s, error answers in OpenAI's envelope, request ids and the supervisor of
background loops. The gateway and the admin service import it; it imports neither."""
