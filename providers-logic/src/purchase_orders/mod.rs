//! `purchase-orders`: purchase orders between a buyer and a seller company, with seller
//! amendments, optimistic versions and an ERP sync outbox.
//!
//! Who is who comes from the caller's `company_id` claim: the buyer company creates, updates,
//! approves and cancels; the seller company confirms or proposes changes; a company sees only
//! the orders it is a party to. Every change is one transaction that takes the tenant's
//! outbox counter first, so changes of a tenant commit one at a time in cursor order: a
//! poller that has seen cursor `n` has seen every change before it. Money and quantities are
//! exact decimals, stored and sent as strings.

use std::str::FromStr;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use providers_core::semver::Version;
use providers_core::{
    Action, CallContext, ConnectContext, Descriptor, ErrorCode, Provider, ProviderError, Status,
    async_trait,
};
use rust_decimal::{Decimal, RoundingStrategy};
use serde::Deserialize;
use serde_json::{Value, json};
use sqlx::any::AnyRow;
use sqlx::{Any, AnyPool, Row, Transaction};

mod states;

use states::{Amendment, Party, State};

/// The `purchase-orders` provider.
#[derive(Default)]
pub struct PurchaseOrders {
    state: OnceLock<Connected>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "default_currency")]
    currency: String,
    #[serde(default = "default_prefix")]
    number_prefix: String,
    /// A rule set of the `rules` service deciding whether a new or changed order needs approval.
    #[serde(default)]
    approval_rules: Option<String>,
    /// The decision of that set that means "needs approval".
    #[serde(default = "default_decision")]
    approval_decision: String,
}

fn default_currency() -> String {
    "USD".into()
}
fn default_prefix() -> String {
    "PO-".into()
}
fn default_decision() -> String {
    "require_approval".into()
}

struct Connected {
    pool: AnyPool,
    tenant: String,
    config: Config,
}

const QUANTITY_SCALE: u32 = 3;
const PRICE_SCALE: u32 = 2;
/// Largest quantity or unit price accepted: twelve integer digits.
const MAX_AMOUNT: i64 = 999_999_999_999;
const MAX_PAGE: i64 = 500;
const MAX_UPDATES_PAGE: i64 = 1000;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn storage(e: sqlx::Error) -> ProviderError {
    tracing::warn!(error = %e, "purchase-orders storage failed");
    ProviderError::unavailable("purchase-orders storage is unavailable; the host log has the cause")
}

/// A decimal string with at most `scale` decimals, positive, within [`MAX_AMOUNT`].
fn amount(field: &str, text: &str, scale: u32) -> Result<Decimal, ProviderError> {
    let bad = |why: &str| ProviderError::validation(format!("{field}: '{text}' {why}"));
    let well_formed = {
        let (int, frac) = text.split_once('.').unwrap_or((text, ""));
        !int.is_empty()
            && int.bytes().all(|b| b.is_ascii_digit())
            && frac.bytes().all(|b| b.is_ascii_digit())
            && text.contains('.') != frac.is_empty()
    };
    if !well_formed {
        return Err(bad(
            "is not a decimal number written as digits, e.g. \"12.5\"",
        ));
    }
    let d = Decimal::from_str(text).map_err(|_| bad("is not a decimal number"))?;
    if d.scale() > scale {
        return Err(bad(&format!("has more than {scale} decimal places")));
    }
    if d <= Decimal::ZERO {
        return Err(bad("must be greater than zero"));
    }
    if d > Decimal::from(MAX_AMOUNT) {
        return Err(bad(&format!("is more than {MAX_AMOUNT}")));
    }
    Ok(d)
}

fn fixed(d: Decimal, scale: u32) -> String {
    let mut d = d.round_dp_with_strategy(scale, RoundingStrategy::MidpointAwayFromZero);
    d.rescale(scale);
    d.to_string()
}

/// quantity × unit price, rounded half away from zero to cents.
fn total(quantity: Decimal, unit_price: Decimal) -> String {
    fixed(quantity * unit_price, PRICE_SCALE)
}

/// A calendar date `YYYY-MM-DD`.
fn date(field: &str, text: &str) -> Result<String, ProviderError> {
    let parts: Vec<&str> = text.split('-').collect();
    let ok = match parts.as_slice() {
        [y, m, d] if y.len() == 4 && m.len() == 2 && d.len() == 2 => {
            match (y.parse::<u32>(), m.parse::<u32>(), d.parse::<u32>()) {
                (Ok(y), Ok(m), Ok(d)) => {
                    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
                    let days = match m {
                        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
                        4 | 6 | 9 | 11 => 30,
                        2 if leap => 29,
                        2 => 28,
                        _ => 0,
                    };
                    y >= 1 && (1..=days).contains(&d)
                }
                _ => false,
            }
        }
        _ => false,
    };
    if ok {
        Ok(text.to_owned())
    } else {
        Err(ProviderError::validation(format!(
            "{field}: '{text}' is not a calendar date YYYY-MM-DD"
        )))
    }
}

fn text(field: &str, value: &str, max: usize) -> Result<String, ProviderError> {
    let v = value.trim();
    if v.is_empty() || v.chars().count() > max || v.chars().any(char::is_control) {
        return Err(ProviderError::validation(format!(
            "{field}: must be 1 to {max} characters without control characters"
        )));
    }
    Ok(v.to_owned())
}

fn parse<T: serde::de::DeserializeOwned>(payload: Value) -> Result<T, ProviderError> {
    serde_json::from_value(payload).map_err(|e| ProviderError::validation(e.to_string()))
}

const COLUMNS: &str = "po_number, seq, version, buyer_company, seller_company, product, quantity, unit, unit_price, total, currency, \
     delivery_date, delivery_location, status, amendment_status, proposed_quantity, proposed_unit, proposed_unit_price, \
     proposed_delivery_date, amendment_reason, buyer_notes, erp_sync_status, created_by, changed_by, created_ms, updated_ms";

/// One order as stored.
#[derive(Debug, Clone)]
struct Order {
    po_number: String,
    seq: i64,
    version: i64,
    buyer_company: String,
    seller_company: String,
    product: String,
    quantity: String,
    unit: String,
    unit_price: String,
    total: String,
    currency: String,
    delivery_date: String,
    delivery_location: String,
    status: State,
    amendment: Amendment,
    proposed_quantity: Option<String>,
    proposed_unit: Option<String>,
    proposed_unit_price: Option<String>,
    proposed_delivery_date: Option<String>,
    amendment_reason: Option<String>,
    buyer_notes: Option<String>,
    erp_sync_status: String,
    created_by: String,
    /// Who made the last change (an approval must come from someone else).
    changed_by: String,
    created_ms: i64,
    updated_ms: i64,
}

impl Order {
    fn from_row(r: &AnyRow) -> Result<Self, ProviderError> {
        let s = |name: &str| r.try_get::<String, _>(name).map_err(storage);
        let o = |name: &str| r.try_get::<Option<String>, _>(name).map_err(storage);
        let i = |name: &str| r.try_get::<i64, _>(name).map_err(storage);
        let status = s("status")?;
        let amendment = s("amendment_status")?;
        Ok(Self {
            po_number: s("po_number")?,
            seq: i("seq")?,
            version: i("version")?,
            buyer_company: s("buyer_company")?,
            seller_company: s("seller_company")?,
            product: s("product")?,
            quantity: s("quantity")?,
            unit: s("unit")?,
            unit_price: s("unit_price")?,
            total: s("total")?,
            currency: s("currency")?,
            delivery_date: s("delivery_date")?,
            delivery_location: s("delivery_location")?,
            status: State::parse(&status)
                .ok_or_else(|| ProviderError::internal(format!("stored status '{status}'")))?,
            amendment: Amendment::parse(&amendment).ok_or_else(|| {
                ProviderError::internal(format!("stored amendment status '{amendment}'"))
            })?,
            proposed_quantity: o("proposed_quantity")?,
            proposed_unit: o("proposed_unit")?,
            proposed_unit_price: o("proposed_unit_price")?,
            proposed_delivery_date: o("proposed_delivery_date")?,
            amendment_reason: o("amendment_reason")?,
            buyer_notes: o("buyer_notes")?,
            erp_sync_status: s("erp_sync_status")?,
            created_by: s("created_by")?,
            changed_by: s("changed_by")?,
            created_ms: i("created_ms")?,
            updated_ms: i("updated_ms")?,
        })
    }

    fn json(&self) -> Value {
        json!({
            "po_number": self.po_number,
            "version": self.version,
            "buyer_company": self.buyer_company,
            "seller_company": self.seller_company,
            "product": self.product,
            "quantity": self.quantity,
            "unit": self.unit,
            "unit_price": self.unit_price,
            "total": self.total,
            "currency": self.currency,
            "delivery_date": self.delivery_date,
            "delivery_location": self.delivery_location,
            "status": self.status.as_str(),
            "amendment_status": self.amendment.as_str(),
            "proposed_quantity": self.proposed_quantity,
            "proposed_unit": self.proposed_unit,
            "proposed_unit_price": self.proposed_unit_price,
            "proposed_delivery_date": self.proposed_delivery_date,
            "amendment_reason": self.amendment_reason,
            "buyer_notes": self.buyer_notes,
            "erp_sync_status": self.erp_sync_status,
            "created_by": self.created_by,
            "changed_by": self.changed_by,
            "created_ms": self.created_ms,
            "updated_ms": self.updated_ms,
        })
    }

    /// What the approval rules see: the order with its amounts as numbers.
    fn rules_input(&self) -> Value {
        let number = |s: &str| {
            serde_json::Number::from_str(s)
                .map(Value::Number)
                .unwrap_or(Value::Null)
        };
        json!({"order": {
            "po_number": self.po_number,
            "buyer_company": self.buyer_company,
            "seller_company": self.seller_company,
            "product": self.product,
            "quantity": number(&self.quantity),
            "unit": self.unit,
            "unit_price": number(&self.unit_price),
            "total": number(&self.total),
            "currency": self.currency,
            "delivery_date": self.delivery_date,
            "created_by": self.created_by,
        }})
    }

    fn party(&self, company: &str) -> Option<Party> {
        if company == self.buyer_company {
            Some(Party::Buyer)
        } else if company == self.seller_company {
            Some(Party::Seller)
        } else {
            None
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateReq {
    #[serde(default)]
    po_number: Option<String>,
    #[serde(default)]
    buyer_company: Option<String>,
    seller_company: String,
    product: String,
    quantity: String,
    unit: String,
    unit_price: String,
    #[serde(default)]
    currency: Option<String>,
    delivery_date: String,
    delivery_location: String,
    #[serde(default)]
    buyer_notes: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateReq {
    po_number: String,
    version: i64,
    #[serde(default)]
    product: Option<String>,
    #[serde(default)]
    quantity: Option<String>,
    #[serde(default)]
    unit: Option<String>,
    #[serde(default)]
    unit_price: Option<String>,
    #[serde(default)]
    delivery_date: Option<String>,
    #[serde(default)]
    delivery_location: Option<String>,
    #[serde(default)]
    buyer_notes: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProposeReq {
    po_number: String,
    #[serde(default)]
    version: Option<i64>,
    #[serde(default)]
    proposed_quantity: Option<String>,
    #[serde(default)]
    proposed_unit: Option<String>,
    #[serde(default)]
    proposed_unit_price: Option<String>,
    #[serde(default)]
    proposed_delivery_date: Option<String>,
    amendment_reason: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DecideReq {
    po_number: String,
    #[serde(default)]
    version: Option<i64>,
    #[serde(default)]
    approve: Option<bool>,
    #[serde(default)]
    buyer_notes: Option<String>,
    #[serde(default)]
    reason: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListReq {
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    seller_company: Option<String>,
    #[serde(default)]
    buyer_company: Option<String>,
    #[serde(default)]
    delivery_from: Option<String>,
    #[serde(default)]
    delivery_to: Option<String>,
    #[serde(default)]
    limit: Option<i64>,
    #[serde(default)]
    after: Option<String>,
}

fn company(ctx: &CallContext) -> Result<&str, ProviderError> {
    ctx.company_id().ok_or_else(|| {
        ProviderError::new(
            ErrorCode::Forbidden,
            "purchase orders need the company the caller acts for: the token has no company_id claim",
        )
    })
}

/// How [`Connected::save`] writes an order.
enum Write<'a> {
    /// A new order, made under this idempotency key and request, if any.
    Insert { key: Option<(&'a str, &'a str)> },
    /// Over the stored order.
    Update,
}

impl Connected {
    async fn load(
        &self,
        tx: &mut Transaction<'static, Any>,
        po_number: &str,
    ) -> Result<Option<Order>, ProviderError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM po_orders WHERE tenant = $1 AND po_number = $2"
        )))
        .bind(&self.tenant)
        .bind(po_number)
        .fetch_optional(&mut **tx)
        .await
        .map_err(storage)?;
        row.as_ref().map(Order::from_row).transpose()
    }

    /// Advances the tenant's counter `name` inside `tx`. The outbox counter is always taken
    /// first in a change: it is the lock that orders a tenant's changes.
    async fn next(
        &self,
        tx: &mut Transaction<'static, Any>,
        name: &str,
    ) -> Result<i64, ProviderError> {
        let row = sqlx::query(
            "INSERT INTO po_counters (tenant, name, last) VALUES ($1, $2, 1) \
             ON CONFLICT (tenant, name) DO UPDATE SET last = po_counters.last + 1 RETURNING last",
        )
        .bind(&self.tenant)
        .bind(name)
        .fetch_one(&mut **tx)
        .await
        .map_err(storage)?;
        row.try_get::<i64, _>(0).map_err(storage)
    }

    async fn needs_approval(
        &self,
        order: &Order,
        ctx: &CallContext,
    ) -> Result<bool, ProviderError> {
        let Some(set) = &self.config.approval_rules else {
            return Ok(false);
        };
        let answer = ctx
            .call(
                "rules",
                "evaluate",
                json!({"set": set, "input": order.rules_input()}),
            )
            .await?;
        Ok(answer["decision"].as_str() == Some(self.config.approval_decision.as_str()))
    }

    /// Writes `order` and its outbox record in `tx`, then commits: over the stored order, or
    /// as a new one (`Write::Insert`, with the idempotency key and request it was made under).
    async fn save(
        &self,
        mut tx: Transaction<'static, Any>,
        cursor: i64,
        order: &mut Order,
        event: &str,
        write: Write<'_>,
    ) -> Result<Value, ProviderError> {
        order.erp_sync_status = "PENDING".into();
        let o = &*order;
        let sql = if let Write::Insert { .. } = write {
            format!(
                "INSERT INTO po_orders (tenant, {COLUMNS}, idempotency_key, idempotency_request) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22, $23, $24, $25, $26, $27, $28, $29)"
            )
        } else {
            "UPDATE po_orders SET po_number = $2, seq = $3, version = $4, buyer_company = $5, seller_company = $6, product = $7, \
             quantity = $8, unit = $9, unit_price = $10, total = $11, currency = $12, delivery_date = $13, delivery_location = $14, \
             status = $15, amendment_status = $16, proposed_quantity = $17, proposed_unit = $18, proposed_unit_price = $19, \
             proposed_delivery_date = $20, amendment_reason = $21, buyer_notes = $22, erp_sync_status = $23, created_by = $24, \
             changed_by = $25, created_ms = $26, updated_ms = $27 WHERE tenant = $1 AND po_number = $2".to_owned()
        };
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(&self.tenant)
            .bind(&o.po_number)
            .bind(o.seq)
            .bind(o.version)
            .bind(&o.buyer_company)
            .bind(&o.seller_company)
            .bind(&o.product)
            .bind(&o.quantity)
            .bind(&o.unit)
            .bind(&o.unit_price)
            .bind(&o.total)
            .bind(&o.currency)
            .bind(&o.delivery_date)
            .bind(&o.delivery_location)
            .bind(o.status.as_str())
            .bind(o.amendment.as_str())
            .bind(o.proposed_quantity.as_deref())
            .bind(o.proposed_unit.as_deref())
            .bind(o.proposed_unit_price.as_deref())
            .bind(o.proposed_delivery_date.as_deref())
            .bind(o.amendment_reason.as_deref())
            .bind(o.buyer_notes.as_deref())
            .bind(&o.erp_sync_status)
            .bind(&o.created_by)
            .bind(&o.changed_by)
            .bind(o.created_ms)
            .bind(o.updated_ms);
        if let Write::Insert { key } = write {
            query = query
                .bind(key.map(|(k, _)| k))
                .bind(key.map(|(_, request)| request));
        }
        query.execute(&mut *tx).await.map_err(storage)?;
        let snapshot = o.json();
        sqlx::query(
            "INSERT INTO po_updates (tenant, cursor, po_number, event, version, snapshot, at_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&self.tenant)
        .bind(cursor)
        .bind(&o.po_number)
        .bind(event)
        .bind(o.version)
        .bind(snapshot.to_string())
        .bind(o.updated_ms)
        .execute(&mut *tx)
        .await
        .map_err(storage)?;
        tx.commit().await.map_err(storage)?;
        Ok(snapshot)
    }

    async fn create(&self, req: CreateReq, ctx: &CallContext) -> Result<Value, ProviderError> {
        let buyer = company(ctx)?.to_owned();
        if let Some(asked) = &req.buyer_company
            && *asked != buyer
        {
            return Err(ProviderError::new(
                ErrorCode::Forbidden,
                format!("buyer_company '{asked}' is not the company you act for ('{buyer}')"),
            ));
        }
        let seller = text("seller_company", &req.seller_company, 64)?;
        if seller == buyer {
            return Err(ProviderError::validation(
                "seller_company: a company cannot order from itself",
            ));
        }
        let quantity = amount("quantity", &req.quantity, QUANTITY_SCALE)?;
        let unit_price = amount("unit_price", &req.unit_price, PRICE_SCALE)?;
        let currency = match &req.currency {
            Some(c) if c.len() == 3 && c.bytes().all(|b| b.is_ascii_uppercase()) => c.clone(),
            Some(c) => {
                return Err(ProviderError::validation(format!(
                    "currency: '{c}' is not a three-letter ISO 4217 code"
                )));
            }
            None => self.config.currency.clone(),
        };
        if let Some(n) = &req.po_number
            && (n.is_empty()
                || n.len() > 40
                || !n
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b)))
        {
            return Err(ProviderError::validation(format!(
                "po_number: '{n}' must be 1 to 40 letters, digits, '-', '_', '.' or '/'"
            )));
        }
        if let Some(n) = &req.po_number
            && let Some(digits) = n.strip_prefix(&self.config.number_prefix)
            && !digits.is_empty()
            && digits.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(ProviderError::validation(format!(
                "po_number: '{n}' has the form of the numbers this provider gives ({}000001, …); leave po_number out to get one, or choose another",
                self.config.number_prefix
            )));
        }
        let now = now_ms();
        let mut order = Order {
            po_number: req.po_number.clone().unwrap_or_default(),
            seq: 0,
            version: 1,
            buyer_company: buyer,
            seller_company: seller,
            product: text("product", &req.product, 200)?,
            quantity: fixed(quantity, QUANTITY_SCALE),
            unit: text("unit", &req.unit, 16)?,
            unit_price: fixed(unit_price, PRICE_SCALE),
            total: total(quantity, unit_price),
            currency,
            delivery_date: date("delivery_date", &req.delivery_date)?,
            delivery_location: text("delivery_location", &req.delivery_location, 200)?,
            status: State::Open,
            amendment: Amendment::None,
            proposed_quantity: None,
            proposed_unit: None,
            proposed_unit_price: None,
            proposed_delivery_date: None,
            amendment_reason: None,
            buyer_notes: req
                .buyer_notes
                .as_deref()
                .map(|n| text("buyer_notes", n, 2000))
                .transpose()?,
            erp_sync_status: "PENDING".into(),
            created_by: ctx.subject().to_owned(),
            changed_by: ctx.subject().to_owned(),
            created_ms: now,
            updated_ms: now,
        };
        // Rules run before the transaction: no lock is held across a call to another provider.
        if self.needs_approval(&order, ctx).await? {
            order.status = State::PendingApproval;
        }
        // What a key stands for: the request as checked, so a retry matches whatever the
        // order became since and another request under the same key does not.
        let request = ctx.idempotency_key().map(|_| {
            json!({
                "po_number": req.po_number,
                "buyer_company": order.buyer_company,
                "seller_company": order.seller_company,
                "product": order.product,
                "quantity": order.quantity,
                "unit": order.unit,
                "unit_price": order.unit_price,
                "currency": order.currency,
                "delivery_date": order.delivery_date,
                "delivery_location": order.delivery_location,
                "buyer_notes": order.buyer_notes,
            })
            .to_string()
        });
        let mut tx = self.pool.begin().await.map_err(storage)?;
        // The counter's row lock orders creates of one tenant: two calls with one key cannot
        // both miss the first's order.
        let cursor = self.next(&mut tx, "update").await?;
        if let (Some(key), Some(request)) = (ctx.idempotency_key(), &request) {
            let made = sqlx::query(
                "SELECT po_number, idempotency_request FROM po_orders WHERE tenant = $1 AND idempotency_key = $2",
            )
            .bind(&self.tenant)
            .bind(key)
            .fetch_optional(&mut *tx)
            .await
            .map_err(storage)?;
            if let Some(row) = made {
                let po: String = row.try_get(0).map_err(storage)?;
                let asked: Option<String> = row.try_get(1).map_err(storage)?;
                drop(tx);
                if asked.as_deref() != Some(request.as_str()) {
                    return Err(ProviderError::conflict(format!(
                        "idempotency key '{key}' was used to create purchase order '{po}' from another request"
                    )));
                }
                return Ok(self.get_visible(&po, ctx).await?.json());
            }
        }
        order.seq = self.next(&mut tx, "order").await?;
        if order.po_number.is_empty() {
            order.po_number = format!("{}{:06}", self.config.number_prefix, order.seq);
        }
        if self.load(&mut tx, &order.po_number).await?.is_some() {
            return Err(ProviderError::conflict(format!(
                "purchase order '{}' already exists",
                order.po_number
            )));
        }
        let key = ctx.idempotency_key().zip(request.as_deref());
        self.save(tx, cursor, &mut order, "created", Write::Insert { key })
            .await
    }

    /// Begins a change of `po_number` by `action`: takes the outbox lock, loads the order,
    /// and checks the caller's party, the version and the state machine, in that order.
    async fn begin_change(
        &self,
        po_number: &str,
        action: &str,
        version: Option<i64>,
        ctx: &CallContext,
    ) -> Result<(Transaction<'static, Any>, i64, Order), ProviderError> {
        let me = company(ctx)?;
        let mut tx = self.pool.begin().await.map_err(storage)?;
        let cursor = self.next(&mut tx, "update").await?;
        let order = self
            .load(&mut tx, po_number)
            .await?
            .filter(|o| o.party(me).is_some())
            .ok_or_else(|| not_found(po_number))?;
        let needed = states::party_of(action);
        if order.party(me) != Some(needed) {
            let (who, company) = match needed {
                Party::Buyer => ("buyer", &order.buyer_company),
                Party::Seller => ("seller", &order.seller_company),
            };
            return Err(ProviderError::new(
                ErrorCode::Forbidden,
                format!(
                    "only the {who} company ('{company}') may {action} purchase order '{po_number}'; you act for '{me}'"
                ),
            ));
        }
        if let Some(v) = version
            && v != order.version
        {
            return Err(ProviderError::conflict(format!(
                "purchase order '{po_number}' is at version {}; this change was based on version {v} (get it again and retry)",
                order.version
            )));
        }
        states::check(&order, action)?;
        Ok((tx, cursor, order))
    }

    async fn update(&self, req: UpdateReq, ctx: &CallContext) -> Result<Value, ProviderError> {
        // Checked up front so bad input is refused before any lock is taken.
        let quantity = req
            .quantity
            .as_deref()
            .map(|q| amount("quantity", q, QUANTITY_SCALE))
            .transpose()?;
        let unit_price = req
            .unit_price
            .as_deref()
            .map(|p| amount("unit_price", p, PRICE_SCALE))
            .transpose()?;
        let delivery_date = req
            .delivery_date
            .as_deref()
            .map(|d| date("delivery_date", d))
            .transpose()?;
        let product = req
            .product
            .as_deref()
            .map(|p| text("product", p, 200))
            .transpose()?;
        let unit = req
            .unit
            .as_deref()
            .map(|u| text("unit", u, 16))
            .transpose()?;
        let location = req
            .delivery_location
            .as_deref()
            .map(|l| text("delivery_location", l, 200))
            .transpose()?;
        let notes = req
            .buyer_notes
            .as_deref()
            .map(|n| text("buyer_notes", n, 2000))
            .transpose()?;
        // The approval rules need the changed order, which needs the current one: read it,
        // ask the rules outside any transaction, then apply under the lock only if the version
        // read is still the current one.
        let current = self.get_visible(&req.po_number, ctx).await?;
        let mut order = current.clone();
        if let Some(q) = quantity {
            order.quantity = fixed(q, QUANTITY_SCALE);
        }
        if let Some(p) = unit_price {
            order.unit_price = fixed(p, PRICE_SCALE);
        }
        let q = Decimal::from_str(&order.quantity)
            .map_err(|e| ProviderError::internal(e.to_string()))?;
        let p = Decimal::from_str(&order.unit_price)
            .map_err(|e| ProviderError::internal(e.to_string()))?;
        order.total = total(q, p);
        if let Some(d) = delivery_date {
            order.delivery_date = d;
        }
        if let Some(v) = product {
            order.product = v;
        }
        if let Some(v) = unit {
            order.unit = v;
        }
        if let Some(v) = location {
            order.delivery_location = v;
        }
        if notes.is_some() {
            order.buyer_notes = notes;
        }
        let approval = self.needs_approval(&order, ctx).await?;
        let (tx, cursor, locked) = self
            .begin_change(&req.po_number, "update", Some(req.version), ctx)
            .await?;
        if locked.version != current.version {
            return Err(ProviderError::conflict(format!(
                "purchase order '{}' changed while this update was checked (now version {}); get it again and retry",
                req.po_number, locked.version
            )));
        }
        order.status = if approval {
            State::PendingApproval
        } else {
            State::Open
        };
        order.version = locked.version + 1;
        order.updated_ms = now_ms();
        order.changed_by = ctx.subject().to_owned();
        self.save(tx, cursor, &mut order, "updated", Write::Update)
            .await
    }

    async fn transition(
        &self,
        action: &str,
        req: DecideReq,
        ctx: &CallContext,
    ) -> Result<Value, ProviderError> {
        let notes = req
            .buyer_notes
            .as_deref()
            .map(|n| text("buyer_notes", n, 2000))
            .transpose()?;
        if action == "approve_changes" && req.approve.is_none() {
            return Err(ProviderError::validation(
                "approve: say true to accept the seller's proposal or false to reject it",
            ));
        }
        if matches!(action, "approve" | "approve_changes") && req.version.is_none() {
            return Err(ProviderError::validation(format!(
                "version: {action} needs the version of the order that was reviewed"
            )));
        }
        // Accepted terms go through the approval rules like any change: ask them outside
        // the transaction, on the order as it will be.
        let mut accepted_needs_approval = false;
        if action == "approve_changes" && req.approve == Some(true) {
            let mut amended = self.get_visible(&req.po_number, ctx).await?;
            apply_proposal(&mut amended)?;
            accepted_needs_approval = self.needs_approval(&amended, ctx).await?;
        }
        let (tx, cursor, mut order) = self
            .begin_change(&req.po_number, action, req.version, ctx)
            .await?;
        let event = match action {
            "approve" => {
                if order.created_by == ctx.subject() || order.changed_by == ctx.subject() {
                    let what = if order.created_by == ctx.subject() {
                        "created"
                    } else {
                        "last changed"
                    };
                    return Err(ProviderError::new(
                        ErrorCode::Forbidden,
                        format!(
                            "'{}' {what} purchase order '{}' and cannot approve it too",
                            ctx.subject(),
                            order.po_number
                        ),
                    ));
                }
                order.status = State::Open;
                "approved"
            }
            "cancel" => {
                order.status = State::Cancelled;
                if let Some(reason) = &req.reason {
                    order.buyer_notes = Some(text("reason", reason, 2000)?);
                }
                "cancelled"
            }
            "seller_confirm" => {
                order.status = State::Confirmed;
                "confirmed"
            }
            "approve_changes" if req.approve == Some(true) => {
                apply_proposal(&mut order)?;
                order.amendment = Amendment::Approved;
                // The seller proposed these terms and the buyer accepted them: agreed, unless
                // the rules want a second person to approve the new terms first.
                order.status = if accepted_needs_approval {
                    State::PendingApproval
                } else {
                    State::Confirmed
                };
                "changes_approved"
            }
            "approve_changes" => {
                order.proposed_quantity = None;
                order.proposed_unit = None;
                order.proposed_unit_price = None;
                order.proposed_delivery_date = None;
                order.amendment = Amendment::Rejected;
                "changes_rejected"
            }
            other => return Err(ProviderError::internal(format!("transition '{other}'"))),
        };
        if notes.is_some() {
            order.buyer_notes = notes;
        }
        order.version += 1;
        order.updated_ms = now_ms();
        order.changed_by = ctx.subject().to_owned();
        self.save(tx, cursor, &mut order, event, Write::Update)
            .await
    }

    async fn propose(&self, req: ProposeReq, ctx: &CallContext) -> Result<Value, ProviderError> {
        let quantity = req
            .proposed_quantity
            .as_deref()
            .map(|q| {
                amount("proposed_quantity", q, QUANTITY_SCALE).map(|d| fixed(d, QUANTITY_SCALE))
            })
            .transpose()?;
        let unit_price = req
            .proposed_unit_price
            .as_deref()
            .map(|p| amount("proposed_unit_price", p, PRICE_SCALE).map(|d| fixed(d, PRICE_SCALE)))
            .transpose()?;
        let unit = req
            .proposed_unit
            .as_deref()
            .map(|u| text("proposed_unit", u, 16))
            .transpose()?;
        let delivery = req
            .proposed_delivery_date
            .as_deref()
            .map(|d| date("proposed_delivery_date", d))
            .transpose()?;
        if quantity.is_none() && unit_price.is_none() && unit.is_none() && delivery.is_none() {
            return Err(ProviderError::validation(
                "propose at least one of proposed_quantity, proposed_unit, proposed_unit_price, proposed_delivery_date",
            ));
        }
        let reason = text("amendment_reason", &req.amendment_reason, 2000)?;
        let (tx, cursor, mut order) = self
            .begin_change(&req.po_number, "propose_changes", req.version, ctx)
            .await?;
        order.proposed_quantity = quantity;
        order.proposed_unit = unit;
        order.proposed_unit_price = unit_price;
        order.proposed_delivery_date = delivery;
        order.amendment_reason = Some(reason);
        order.amendment = Amendment::Proposed;
        order.version += 1;
        order.updated_ms = now_ms();
        order.changed_by = ctx.subject().to_owned();
        self.save(tx, cursor, &mut order, "changes_proposed", Write::Update)
            .await
    }

    async fn get_visible(
        &self,
        po_number: &str,
        ctx: &CallContext,
    ) -> Result<Order, ProviderError> {
        let me = company(ctx)?;
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM po_orders WHERE tenant = $1 AND po_number = $2 AND (buyer_company = $3 OR seller_company = $3)"
        )))
        .bind(&self.tenant)
        .bind(po_number)
        .bind(me)
        .fetch_optional(&self.pool)
        .await
        .map_err(storage)?;
        row.as_ref()
            .map(Order::from_row)
            .transpose()?
            .ok_or_else(|| not_found(po_number))
    }

    async fn list(&self, req: ListReq, ctx: &CallContext) -> Result<Value, ProviderError> {
        let me = company(ctx)?;
        let limit = req.limit.unwrap_or(50);
        if !(1..=MAX_PAGE).contains(&limit) {
            return Err(ProviderError::validation(format!(
                "limit: {limit} is not between 1 and {MAX_PAGE}"
            )));
        }
        let after: i64 = match &req.after {
            None => 0,
            Some(a) => a.parse().map_err(|_| {
                ProviderError::validation(format!(
                    "after: '{a}' is not a cursor this provider returned as `next`"
                ))
            })?,
        };
        if let Some(s) = &req.status
            && State::parse(s).is_none()
        {
            return Err(ProviderError::validation(format!(
                "status: '{s}' is not one of {}",
                State::ALL.map(State::as_str).join(", ")
            )));
        }
        for (field, d) in [
            ("delivery_from", &req.delivery_from),
            ("delivery_to", &req.delivery_to),
        ] {
            if let Some(d) = d {
                date(field, d)?;
            }
        }
        let mut sql = format!(
            "SELECT {COLUMNS} FROM po_orders WHERE tenant = $1 AND (buyer_company = $2 OR seller_company = $2) AND seq > $3"
        );
        let mut binds: Vec<&str> = Vec::new();
        for (column, op, value) in [
            ("status", "=", &req.status),
            ("seller_company", "=", &req.seller_company),
            ("buyer_company", "=", &req.buyer_company),
            ("delivery_date", ">=", &req.delivery_from),
            ("delivery_date", "<=", &req.delivery_to),
        ] {
            if let Some(v) = value {
                binds.push(v);
                sql.push_str(&format!(" AND {column} {op} ${}", binds.len() + 3));
            }
        }
        sql.push_str(&format!(" ORDER BY seq LIMIT {}", limit + 1));
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(&self.tenant)
            .bind(me)
            .bind(after);
        for b in binds {
            query = query.bind(b);
        }
        let rows = query.fetch_all(&self.pool).await.map_err(storage)?;
        let mut orders = rows
            .iter()
            .map(Order::from_row)
            .collect::<Result<Vec<_>, _>>()?;
        let more = orders.len() > limit as usize;
        orders.truncate(limit as usize);
        let next = if more {
            orders.last().map(|o| o.seq.to_string())
        } else {
            None
        };
        Ok(json!({
            "orders": orders.iter().map(Order::json).collect::<Vec<_>>(),
            "next": next,
        }))
    }

    async fn pending_updates(&self, payload: &Value) -> Result<Value, ProviderError> {
        let since = payload["since"].as_i64().unwrap_or(0);
        let limit = payload["limit"].as_i64().unwrap_or(100);
        if since < 0 {
            return Err(ProviderError::validation(format!(
                "since: {since} is not a cursor (cursors start at 1; 0 means from the beginning)"
            )));
        }
        if !(1..=MAX_UPDATES_PAGE).contains(&limit) {
            return Err(ProviderError::validation(format!(
                "limit: {limit} is not between 1 and {MAX_UPDATES_PAGE}"
            )));
        }
        let rows = sqlx::query(
            "SELECT cursor, po_number, event, version, snapshot, at_ms FROM po_updates \
             WHERE tenant = $1 AND cursor > $2 AND acknowledged_ms IS NULL ORDER BY cursor LIMIT $3",
        )
        .bind(&self.tenant)
        .bind(since)
        .bind(limit + 1)
        .fetch_all(&self.pool)
        .await
        .map_err(storage)?;
        let more = rows.len() > limit as usize;
        let mut updates = Vec::with_capacity(rows.len());
        for r in rows.iter().take(limit as usize) {
            let snapshot: String = r.try_get("snapshot").map_err(storage)?;
            updates.push(json!({
                "id": r.try_get::<i64, _>("cursor").map_err(storage)?,
                "po_number": r.try_get::<String, _>("po_number").map_err(storage)?,
                "event": r.try_get::<String, _>("event").map_err(storage)?,
                "version": r.try_get::<i64, _>("version").map_err(storage)?,
                "at_ms": r.try_get::<i64, _>("at_ms").map_err(storage)?,
                "order": serde_json::from_str::<Value>(&snapshot).map_err(|e| ProviderError::internal(e.to_string()))?,
            }));
        }
        let next = updates
            .last()
            .map_or(since, |u| u["id"].as_i64().unwrap_or(since));
        Ok(json!({"updates": updates, "next": next, "more": more}))
    }

    async fn acknowledge(
        &self,
        payload: &Value,
        ctx: &CallContext,
    ) -> Result<Value, ProviderError> {
        let Some(ids) = payload["ids"].as_array() else {
            return Err(ProviderError::validation(
                "ids: a list of update ids is required",
            ));
        };
        if ids.is_empty() || ids.len() > MAX_UPDATES_PAGE as usize {
            return Err(ProviderError::validation(format!(
                "ids: give 1 to {MAX_UPDATES_PAGE} update ids"
            )));
        }
        let ids: Vec<i64> = ids
            .iter()
            .map(|v| {
                v.as_i64().filter(|i| *i > 0).ok_or_else(|| {
                    ProviderError::validation(format!("ids: {v} is not an update id"))
                })
            })
            .collect::<Result<_, _>>()?;
        let now = now_ms();
        let (mut acknowledged, mut already, mut unknown) = (0u64, 0u64, Vec::new());
        let mut tx = self.pool.begin().await.map_err(storage)?;
        // The tenant's change lock first, like every change: a sync status is never decided
        // while a change of the same order is being committed.
        sqlx::query("UPDATE po_counters SET last = last WHERE tenant = $1 AND name = 'update'")
            .bind(&self.tenant)
            .execute(&mut *tx)
            .await
            .map_err(storage)?;
        let mut touched: Vec<String> = Vec::new();
        for id in ids {
            let done = sqlx::query(
                "UPDATE po_updates SET acknowledged_ms = $3, acknowledged_by = $4 \
                 WHERE tenant = $1 AND cursor = $2 AND acknowledged_ms IS NULL RETURNING po_number",
            )
            .bind(&self.tenant)
            .bind(id)
            .bind(now)
            .bind(ctx.subject())
            .fetch_optional(&mut *tx)
            .await
            .map_err(storage)?;
            if let Some(row) = done {
                acknowledged += 1;
                let po: String = row.try_get(0).map_err(storage)?;
                if !touched.contains(&po) {
                    touched.push(po);
                }
                continue;
            }
            // Not acknowledged now: either it was before, or it is not this tenant's.
            let exists = sqlx::query("SELECT 1 FROM po_updates WHERE tenant = $1 AND cursor = $2")
                .bind(&self.tenant)
                .bind(id)
                .fetch_optional(&mut *tx)
                .await
                .map_err(storage)?;
            if exists.is_some() {
                already += 1;
            } else {
                unknown.push(id);
            }
        }
        // An order is in sync once none of its updates waits.
        for po in &touched {
            sqlx::query(
                "UPDATE po_orders SET erp_sync_status = 'SYNCED' WHERE tenant = $1 AND po_number = $2 \
                 AND NOT EXISTS (SELECT 1 FROM po_updates WHERE tenant = $1 AND po_number = $2 AND acknowledged_ms IS NULL)",
            )
            .bind(&self.tenant)
            .bind(po)
            .execute(&mut *tx)
            .await
            .map_err(storage)?;
        }
        tx.commit().await.map_err(storage)?;
        Ok(
            json!({"acknowledged": acknowledged, "already_acknowledged": already, "unknown": unknown}),
        )
    }

    async fn sync_status(&self) -> Result<Value, ProviderError> {
        let row = sqlx::query(
            "SELECT COUNT(*) FILTER (WHERE acknowledged_ms IS NULL), COUNT(*) FILTER (WHERE acknowledged_ms IS NOT NULL), \
             MIN(CASE WHEN acknowledged_ms IS NULL THEN at_ms END), MAX(cursor) FROM po_updates WHERE tenant = $1",
        )
        .bind(&self.tenant)
        .fetch_one(&self.pool)
        .await
        .map_err(storage)?;
        let pending: i64 = row.try_get(0).map_err(storage)?;
        let acknowledged: i64 = row.try_get(1).map_err(storage)?;
        let oldest: Option<i64> = row.try_get(2).map_err(storage)?;
        let last: Option<i64> = row.try_get(3).map_err(storage)?;
        Ok(json!({
            "pending": pending,
            "acknowledged": acknowledged,
            "oldest_pending_age_ms": oldest.map(|at| (now_ms() - at).max(0)),
            "last_cursor": last.unwrap_or(0),
        }))
    }
}

/// The seller's proposed terms applied, the total computed again.
fn apply_proposal(order: &mut Order) -> Result<(), ProviderError> {
    if let Some(q) = order.proposed_quantity.take() {
        order.quantity = q;
    }
    if let Some(u) = order.proposed_unit.take() {
        order.unit = u;
    }
    if let Some(p) = order.proposed_unit_price.take() {
        order.unit_price = p;
    }
    if let Some(d) = order.proposed_delivery_date.take() {
        order.delivery_date = d;
    }
    let q =
        Decimal::from_str(&order.quantity).map_err(|e| ProviderError::internal(e.to_string()))?;
    let p =
        Decimal::from_str(&order.unit_price).map_err(|e| ProviderError::internal(e.to_string()))?;
    order.total = total(q, p);
    Ok(())
}

fn not_found(po_number: &str) -> ProviderError {
    ProviderError::not_found(format!(
        "no purchase order '{po_number}' that your company is a party to"
    ))
}

fn descriptor() -> Descriptor {
    let money = json!({"type": "string", "pattern": "^[0-9]{1,12}(\\.[0-9]{1,2})?$", "description": "a decimal with at most 2 places, as a string"});
    let quantity = json!({"type": "string", "pattern": "^[0-9]{1,12}(\\.[0-9]{1,3})?$", "description": "a decimal with at most 3 places, as a string"});
    let date = json!({"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"});
    let po = json!({"type": "string", "minLength": 1, "maxLength": 40});
    let company = json!({"type": "string", "minLength": 1, "maxLength": 64});
    let name = json!({"type": "string", "minLength": 1, "maxLength": 200});
    let unit = json!({"type": "string", "minLength": 1, "maxLength": 16});
    let notes = json!({"type": "string", "maxLength": 2000});
    let version = json!({"type": "integer", "minimum": 1});
    let status = json!({"type": "string", "enum": State::ALL.map(State::as_str)});
    let order = json!({"type": "object", "properties": {
        "po_number": {"type": "string"}, "version": {"type": "integer"},
        "buyer_company": {"type": "string"}, "seller_company": {"type": "string"}, "product": {"type": "string"},
        "quantity": {"type": "string"}, "unit": {"type": "string"}, "unit_price": {"type": "string"}, "total": {"type": "string"},
        "currency": {"type": "string"}, "delivery_date": {"type": "string"}, "delivery_location": {"type": "string"},
        "status": status, "amendment_status": {"type": "string", "enum": Amendment::ALL.map(Amendment::as_str)},
        "proposed_quantity": {"type": ["string", "null"]}, "proposed_unit": {"type": ["string", "null"]},
        "proposed_unit_price": {"type": ["string", "null"]}, "proposed_delivery_date": {"type": ["string", "null"]},
        "amendment_reason": {"type": ["string", "null"]}, "buyer_notes": {"type": ["string", "null"]},
        "erp_sync_status": {"type": "string", "enum": ["PENDING", "SYNCED"]},
        "created_by": {"type": "string"}, "changed_by": {"type": "string"}, "created_ms": {"type": "integer"}, "updated_ms": {"type": "integer"}
    }});
    let decide = |extra: Value, required: &[&str]| {
        let mut props = json!({"po_number": po, "version": version, "buyer_notes": notes});
        if let (Some(p), Some(e)) = (props.as_object_mut(), extra.as_object()) {
            p.extend(e.clone());
        }
        json!({"type": "object", "properties": props, "required": required, "additionalProperties": false})
    };
    Descriptor::new("purchase-orders", Version::new(1, 0, 0))
        .description("Purchase orders between a buyer and a seller company (the token's company_id claim): amendments proposed by the seller and approved by the buyer, optimistic versions, approval by rules, and an ERP sync outbox.")
        .config_schema(json!({
            "type": "object",
            "properties": {
                "currency": {"type": "string", "pattern": "^[A-Z]{3}$"},
                "number_prefix": {"type": "string", "pattern": "^[A-Za-z0-9._/-]{0,20}$"},
                "approval_rules": {"type": "string", "minLength": 1},
                "approval_decision": {"type": "string", "minLength": 1}
            },
            "additionalProperties": false
        }))
        .action(Action::new("create")
            .description("Creates an order from the caller's company (the buyer) to a seller; the total is computed here. OPEN, or PENDING_APPROVAL when the approval rules say so.")
            .permission("purchase-orders.write")
            .input(json!({"type": "object", "properties": {
                "po_number": po, "buyer_company": company, "seller_company": company, "product": name,
                "quantity": quantity, "unit": unit, "unit_price": money, "currency": {"type": "string", "pattern": "^[A-Z]{3}$"},
                "delivery_date": date, "delivery_location": name, "buyer_notes": notes
            }, "required": ["seller_company", "product", "quantity", "unit", "unit_price", "delivery_date", "delivery_location"], "additionalProperties": false}))
            .output(order.clone()))
        .action(Action::new("get")
            .description("One order the caller's company is a party to.")
            .permission("purchase-orders.read")
            .idempotent()
            .input(json!({"type": "object", "properties": {"po_number": po}, "required": ["po_number"], "additionalProperties": false}))
            .output(order.clone()))
        .action(Action::new("list")
            .description("Orders the caller's company is a party to, in creation order, filtered by status, seller, buyer and delivery date range; `next` pages on.")
            .permission("purchase-orders.read")
            .idempotent()
            .input(json!({"type": "object", "properties": {
                "status": status, "seller_company": company, "buyer_company": company,
                "delivery_from": date, "delivery_to": date,
                "limit": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE}, "after": {"type": "string", "maxLength": 20}
            }, "additionalProperties": false}))
            .output(json!({"type": "object", "properties": {"orders": {"type": "array", "items": order}, "next": {"type": ["string", "null"]}}, "required": ["orders", "next"]})))
        .action(Action::new("update")
            .description("The buyer changes an order that is PENDING_APPROVAL or OPEN with no proposal pending; `version` must be the current one (CONFLICT otherwise). The approval rules run again.")
            .permission("purchase-orders.write")
            .input(decide(json!({"product": name, "quantity": quantity, "unit": unit, "unit_price": money, "delivery_date": date, "delivery_location": name}), &["po_number", "version"]))
            .output(order.clone()))
        .action(Action::new("approve")
            .description("A buyer approver other than its creator approves a PENDING_APPROVAL order: OPEN.")
            .permission("purchase-orders.approve")
            .input(decide(json!({}), &["po_number", "version"]))
            .output(order.clone()))
        .action(Action::new("cancel")
            .description("The buyer cancels an order that is not cancelled yet.")
            .permission("purchase-orders.write")
            .input(decide(json!({"reason": notes}), &["po_number"]))
            .output(order.clone()))
        .action(Action::new("seller_confirm")
            .description("The seller confirms an OPEN order with no proposal pending: CONFIRMED.")
            .permission("purchase-orders.respond")
            .input(decide(json!({}), &["po_number"]))
            .output(order.clone()))
        .action(Action::new("propose_changes")
            .description("The seller proposes a different quantity, unit, unit price or delivery date for an OPEN order, with a reason: amendment PROPOSED.")
            .permission("purchase-orders.respond")
            .input(json!({"type": "object", "properties": {
                "po_number": po, "version": version, "proposed_quantity": quantity, "proposed_unit": unit,
                "proposed_unit_price": money, "proposed_delivery_date": date, "amendment_reason": {"type": "string", "minLength": 1, "maxLength": 2000}
            }, "required": ["po_number", "amendment_reason"], "additionalProperties": false}))
            .output(order.clone()))
        .action(Action::new("approve_changes")
            .description("The buyer accepts (`approve: true`: the proposal applies, total recomputed, CONFIRMED) or rejects (`approve: false`: the order stays OPEN) the seller's proposal, with notes.")
            .permission("purchase-orders.approve")
            .input(decide(json!({"approve": {"type": "boolean"}}), &["po_number", "version", "approve"]))
            .output(order))
        .action(Action::new("pending_updates")
            .description("The ERP sync outbox: unacknowledged changes after cursor `since`, in commit order, each with the order as it was.")
            .permission("purchase-orders.sync")
            .idempotent()
            .input(json!({"type": "object", "properties": {"since": {"type": "integer", "minimum": 0}, "limit": {"type": "integer", "minimum": 1, "maximum": MAX_UPDATES_PAGE}}, "additionalProperties": false}))
            .output(json!({"type": "object", "properties": {"updates": {"type": "array"}, "next": {"type": "integer"}, "more": {"type": "boolean"}}, "required": ["updates", "next", "more"]})))
        .action(Action::new("acknowledge")
            .description("Marks updates as synced. Idempotent: ids acknowledged before, or not this tenant's, change nothing and are counted apart.")
            .permission("purchase-orders.sync")
            .idempotent()
            .input(json!({"type": "object", "properties": {"ids": {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 1, "maxItems": MAX_UPDATES_PAGE}}, "required": ["ids"], "additionalProperties": false}))
            .output(json!({"type": "object", "properties": {"acknowledged": {"type": "integer"}, "already_acknowledged": {"type": "integer"}, "unknown": {"type": "array", "items": {"type": "integer"}}}})))
        .action(Action::new("sync_status")
            .description("Counts of pending and acknowledged updates, the age of the oldest pending one and the last cursor.")
            .permission("purchase-orders.sync")
            .idempotent()
            .input(json!({"type": "object", "additionalProperties": false}))
            .output(json!({"type": "object", "properties": {"pending": {"type": "integer"}, "acknowledged": {"type": "integer"}, "oldest_pending_age_ms": {"type": ["integer", "null"]}, "last_cursor": {"type": "integer"}}})))
}

#[async_trait]
impl Provider for PurchaseOrders {
    fn descriptor(&self) -> Descriptor {
        descriptor()
    }

    async fn connect(&mut self, ctx: &ConnectContext) -> Result<(), ProviderError> {
        let config: Config = serde_json::from_value(ctx.config().clone())
            .map_err(|e| ProviderError::validation(format!("purchase-orders config: {e}")))?;
        let pool = crate::migrate::connected_pool(ctx, "purchase-orders").await?;
        let _ = self.state.set(Connected {
            pool,
            tenant: ctx.tenant().to_owned(),
            config,
        });
        Ok(())
    }

    async fn execute(
        &self,
        action: &str,
        payload: Value,
        ctx: &CallContext,
    ) -> Result<Value, ProviderError> {
        let c = self
            .state
            .get()
            .ok_or_else(|| ProviderError::unavailable("purchase-orders is not connected"))?;
        match action {
            "create" => c.create(parse(payload)?, ctx).await,
            "get" => {
                let po = payload["po_number"].as_str().unwrap_or_default().to_owned();
                Ok(c.get_visible(&po, ctx).await?.json())
            }
            "list" => c.list(parse(payload)?, ctx).await,
            "update" => c.update(parse(payload)?, ctx).await,
            "approve" | "cancel" | "seller_confirm" | "approve_changes" => {
                c.transition(action, parse(payload)?, ctx).await
            }
            "propose_changes" => c.propose(parse(payload)?, ctx).await,
            "pending_updates" => c.pending_updates(&payload).await,
            "acknowledge" => c.acknowledge(&payload, ctx).await,
            "sync_status" => c.sync_status().await,
            other => Err(ProviderError::not_found(format!(
                "purchase-orders has no action '{other}'"
            ))),
        }
    }

    async fn get_status(&self) -> Status {
        match self.state.get() {
            None => Status::failed("not connected"),
            Some(c) => match sqlx::query("SELECT 1").execute(&c.pool).await {
                Ok(_) => Status::ready(),
                Err(e) => Status::failed(format!("storage: {e}")),
            },
        }
    }
}
