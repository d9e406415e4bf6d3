-- The finance cookbook: every query here is shown in docs/finance.md and run by
-- tests/projections/test_finance.py against real data, as the tally_finance role.
-- Format: a `-- name:` line, `-- ` description lines, then the SQL up to the next name.

-- name: usage_by_tenant_and_period
-- Usage per tenant, meter and billing period, with the plan it counted under.
SELECT tenant_id, meter, period_start, period_end, plan_id, quantity, event_count
FROM tally.usage_by_period
ORDER BY period_start, tenant_id, meter;

-- name: top_consumers
-- The ten biggest tenants of each meter in each period.
SELECT period_start, meter, rank, tenant_id, quantity
FROM (
    SELECT period_start, meter, tenant_id, quantity,
           rank() OVER (PARTITION BY period_start, meter ORDER BY quantity DESC) AS rank
    FROM tally.usage_by_period
) ranked
WHERE rank <= 10
ORDER BY period_start, meter, rank, tenant_id;

-- name: overage_by_plan
-- Usage above what the plan includes, per period, plan and meter (plans with an
-- unlimited meter have no overage on it).
SELECT u.period_start, u.plan_id, u.meter,
       count(*) AS tenants_over,
       sum(u.quantity - pm.included) AS overage_units
FROM tally.usage_by_period u
JOIN tally.plan_meters pm ON pm.plan_id = u.plan_id AND pm.meter = u.meter
WHERE pm.included IS NOT NULL AND u.quantity > pm.included
GROUP BY u.period_start, u.plan_id, u.meter
ORDER BY u.period_start, u.plan_id, u.meter;

-- name: revenue_by_month
-- Invoiced revenue per month of the billing period and currency (finalized invoices:
-- open or paid; drafts and voided invoices are not revenue).
SELECT date_trunc('month', period_start AT TIME ZONE 'UTC')::date AS month, currency,
       count(*) AS invoices, sum(total_cents) AS total_cents
FROM tally.invoices
WHERE status IN ('open', 'paid')
GROUP BY 1, 2
ORDER BY 1, 2;

-- name: unpaid_invoices
-- Invoices not yet paid (draft, open or uncollectible), oldest period first.
SELECT invoice_id, tenant_id, period_start, currency, total_cents, status, stripe_invoice_id
FROM tally.invoices
WHERE status NOT IN ('paid', 'void')
ORDER BY period_start, tenant_id;

-- name: invoice_audit
-- Each metered invoice line beside the usage the ledger held when the invoice was made
-- (tally.usage_as_of): rows ingested later, such as late events, cannot move it.
SELECT i.invoice_id, i.tenant_id, l.meter, l.quantity AS invoiced,
       coalesce(a.quantity, 0) AS usage_as_of_invoice,
       l.quantity - coalesce(a.quantity, 0) AS difference
FROM tally.invoices i
JOIN tally.invoice_lines l ON l.invoice_id = i.invoice_id AND l.meter IS NOT NULL
LEFT JOIN LATERAL tally.usage_as_of(i.created_at, i.tenant_id) a
       ON a.meter = l.meter AND a.period_start = i.period_start
ORDER BY i.invoice_id, l.meter;
