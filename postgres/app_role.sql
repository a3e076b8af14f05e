-- Lets the application's role log in: docker-compose.yml's `migrate` service runs it as the
-- database's owner after `creditgate migrate`, with the password as a psql variable:
--   psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -v app_password="$APP_DB_PASSWORD" -f app_role.sql
-- The role, creditgate_app, and its grants come from the migrations (0001 creates it NOLOGIN;
-- it may read and append, never UPDATE, DELETE or TRUNCATE ledger_entries or audit_log). The
-- gateway serves as that role; re-running this sets the password again (a rotation).
ALTER ROLE creditgate_app LOGIN PASSWORD :'app_password';
