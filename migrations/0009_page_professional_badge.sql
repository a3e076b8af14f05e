-- The Credits page shows each package's badge (issue 13: "Best value" on Enterprise, "Best for
-- frequent use" on Professional). Badges are cosmetic (edited in place, billing/purchases/
-- packages.py); an operator's own badge on Professional is kept.
UPDATE packages
   SET badge = 'Best for frequent use', updated_at = now()
 WHERE code = 'professional' AND superseded_at IS NULL AND badge IS NULL;
