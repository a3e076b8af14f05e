-- What the Credits page shows of the catalogue (issue 13): "Best value" on Enterprise (0002)
-- and "Best for frequent use" on Professional; the rate card panel's labels "Eco (gpt-4o-mini)"
-- and "Advanced (gpt-4o)". Badges and labels are cosmetic (edited in place; a new rate card
-- version inherits its label). An operator's own badge or label is kept. A fresh database gets
-- its rate cards from `creditgate seed` afterwards (billing.metering.rate_cards.DEFAULT_RATES,
-- with the same labels).
UPDATE packages
   SET badge = 'Best for frequent use', updated_at = now()
 WHERE code = 'professional' AND superseded_at IS NULL AND badge IS NULL;

UPDATE rate_cards SET display_label = 'Eco' WHERE model = 'gpt-4o-mini' AND display_label = '';
UPDATE rate_cards SET display_label = 'Advanced' WHERE model = 'gpt-4o' AND display_label = '';
