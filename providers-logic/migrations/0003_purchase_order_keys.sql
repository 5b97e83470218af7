-- `purchase-orders` create is idempotent per (tenant, idempotency key): the key of the call
-- (a workflow step's, a client's `Idempotency-Key`) and the request it came with, so the same
-- key sent again returns the order it made and the key reused for another request is refused.
-- NULL keys are distinct in both databases: orders created without a key never collide.
ALTER TABLE po_orders ADD COLUMN idempotency_key TEXT;
ALTER TABLE po_orders ADD COLUMN idempotency_request TEXT;
CREATE UNIQUE INDEX IF NOT EXISTS po_orders_by_key ON po_orders (tenant, idempotency_key);
