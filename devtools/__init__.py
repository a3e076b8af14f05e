"""Development and test tooling, never shipped (the wheel and the image leave it out): the
simulated OpenAI upstream, local PostgreSQL and Redis servers, and the ``make run`` stack."""
