//! The pricing logic, independent of any boundary.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use rust_decimal::{Decimal, RoundingStrategy};
use serde_json::{Value, json};

/// Lines one quote may have.
pub const MAX_LINES: usize = 1000;

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The config or payload is wrong; the message says where.
    Invalid(String),
    /// No such action.
    UnknownAction(String),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Invalid(m) => f.write_str(m),
            Failure::UnknownAction(a) => write!(f, "unknown action '{a}'"),
        }
    }
}

fn invalid(message: impl Into<String>) -> Failure {
    Failure::Invalid(message.into())
}

/// A quantity discount: lines of at least `min_quantity` get `percent` off.
#[derive(Debug, Clone, PartialEq)]
pub struct Tier {
    min_quantity: Decimal,
    percent: Decimal,
}

/// One tenant's prices, discounts and tax rate.
#[derive(Debug, Clone, PartialEq)]
pub struct PriceList {
    currency: String,
    tax_rate: Decimal,
    prices: BTreeMap<String, Decimal>,
    /// Highest `min_quantity` first.
    tiers: Vec<Tier>,
}

/// A decimal from a JSON string or number, exactly as written (numbers keep their text:
/// serde_json's `arbitrary_precision`), never through `f64`.
fn decimal(value: &Value, at: &str) -> Result<Decimal, Failure> {
    let text = match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        _ => {
            return Err(invalid(format!(
                "{at}: expected a decimal number, as a string or a number"
            )));
        }
    };
    Decimal::from_str(text.trim())
        .or_else(|_| Decimal::from_scientific(text.trim()))
        .map_err(|e| invalid(format!("{at}: '{text}' is not a decimal number: {e}")))
}

fn money(d: Decimal) -> Decimal {
    d.round_dp_with_strategy(2, RoundingStrategy::MidpointAwayFromZero)
}

fn quantity(d: Decimal) -> Decimal {
    d.round_dp_with_strategy(3, RoundingStrategy::MidpointAwayFromZero)
}

/// Money as a string with exactly two decimals.
fn money_text(d: Decimal) -> String {
    format!("{:.2}", money(d))
}

impl PriceList {
    /// Reads `{"currency", "tax_rate", "prices": {sku: price}, "discounts": [{"min_quantity", "percent"}]}`.
    pub fn from_config(config: &Value) -> Result<Self, Failure> {
        let currency = config
            .get("currency")
            .and_then(Value::as_str)
            .unwrap_or("EUR")
            .to_owned();
        if currency.len() != 3 || !currency.chars().all(|c| c.is_ascii_uppercase()) {
            return Err(invalid(format!(
                "config.currency: '{currency}' is not a three-letter ISO 4217 code"
            )));
        }
        let tax_rate = match config.get("tax_rate") {
            Some(v) => decimal(v, "config.tax_rate")?,
            None => Decimal::ZERO,
        };
        if tax_rate < Decimal::ZERO || tax_rate > Decimal::ONE {
            return Err(invalid(
                "config.tax_rate: must be between 0 and 1 (0.19 for 19%)",
            ));
        }
        let mut prices = BTreeMap::new();
        if let Some(table) = config.get("prices") {
            let table = table
                .as_object()
                .ok_or_else(|| invalid("config.prices: expected a table of sku = price"))?;
            for (sku, price) in table {
                let at = format!("config.prices.{sku}");
                let price = decimal(price, &at)?;
                if price < Decimal::ZERO {
                    return Err(invalid(format!("{at}: a price cannot be negative")));
                }
                prices.insert(sku.clone(), money(price));
            }
        }
        let mut tiers = Vec::new();
        if let Some(list) = config.get("discounts") {
            let list = list
                .as_array()
                .ok_or_else(|| invalid("config.discounts: expected a list of tiers"))?;
            for (i, tier) in list.iter().enumerate() {
                let at = format!("config.discounts[{i}]");
                let field = |name: &str| {
                    tier.get(name)
                        .ok_or_else(|| invalid(format!("{at}.{name} is required")))
                        .and_then(|v| decimal(v, &format!("{at}.{name}")))
                };
                let (min_quantity, percent) = (field("min_quantity")?, field("percent")?);
                if percent < Decimal::ZERO || percent > Decimal::ONE_HUNDRED {
                    return Err(invalid(format!("{at}.percent: must be between 0 and 100")));
                }
                tiers.push(Tier {
                    min_quantity,
                    percent,
                });
            }
        }
        tiers.sort_by_key(|t| std::cmp::Reverse(t.min_quantity));
        Ok(Self {
            currency,
            tax_rate,
            prices,
            tiers,
        })
    }

    fn percent_for(&self, quantity: Decimal) -> Decimal {
        self.tiers
            .iter()
            .find(|t| quantity >= t.min_quantity)
            .map_or(Decimal::ZERO, |t| t.percent)
    }

    /// Prices the order lines of `payload`: `{"lines": [{"sku", "quantity"}]}`.
    pub fn quote(&self, payload: &Value) -> Result<Value, Failure> {
        let lines = payload
            .get("lines")
            .and_then(Value::as_array)
            .ok_or_else(|| invalid("lines: a list of {sku, quantity} is required"))?;
        if lines.is_empty() {
            return Err(invalid("lines: an order needs at least one line"));
        }
        if lines.len() > MAX_LINES {
            return Err(invalid(format!(
                "lines: {} lines, at most {MAX_LINES} per quote",
                lines.len()
            )));
        }
        let max_quantity = Decimal::from(1_000_000_000u64);
        let mut out = Vec::with_capacity(lines.len());
        let (mut gross_total, mut discount_total) = (Decimal::ZERO, Decimal::ZERO);
        for (i, line) in lines.iter().enumerate() {
            let at = format!("lines[{i}]");
            let sku = line
                .get("sku")
                .and_then(Value::as_str)
                .ok_or_else(|| invalid(format!("{at}.sku is required")))?;
            let unit_price = *self
                .prices
                .get(sku)
                .ok_or_else(|| invalid(format!("{at}.sku: '{sku}' is not in this price list")))?;
            let raw = line
                .get("quantity")
                .ok_or_else(|| invalid(format!("{at}.quantity is required")))?;
            let qty = quantity(decimal(raw, &format!("{at}.quantity"))?);
            if qty <= Decimal::ZERO || qty > max_quantity {
                return Err(invalid(format!(
                    "{at}.quantity: {qty} is out of range (more than 0, at most {max_quantity})"
                )));
            }
            let gross = money(qty * unit_price);
            let percent = self.percent_for(qty);
            let discount = money(gross * percent / Decimal::ONE_HUNDRED);
            gross_total += gross;
            discount_total += discount;
            out.push(json!({
                "sku": sku,
                "quantity": format!("{qty:.3}"),
                "unit_price": money_text(unit_price),
                "gross": money_text(gross),
                "discount_percent": percent.normalize().to_string(),
                "discount": money_text(discount),
                "net": money_text(gross - discount),
            }));
        }
        let subtotal = gross_total - discount_total;
        let tax = money(subtotal * self.tax_rate);
        Ok(json!({
            "currency": self.currency,
            "lines": out,
            "gross": money_text(gross_total),
            "discount": money_text(discount_total),
            "subtotal": money_text(subtotal),
            "tax_rate": self.tax_rate.normalize().to_string(),
            "tax": money_text(tax),
            "total": money_text(subtotal + tax),
        }))
    }

    /// The price list as configured, for clients that show it.
    pub fn listing(&self) -> Value {
        let prices: serde_json::Map<String, Value> = self
            .prices
            .iter()
            .map(|(sku, p)| (sku.clone(), Value::String(money_text(*p))))
            .collect();
        json!({"currency": self.currency, "prices": prices})
    }
}

/// Runs `action` against `list`.
pub fn execute(list: &PriceList, action: &str, payload: &Value) -> Result<Value, Failure> {
    match action {
        "quote" => list.quote(payload),
        "prices" => Ok(list.listing()),
        other => Err(Failure::UnknownAction(other.to_owned())),
    }
}

/// The provider's descriptor, as the contract's JSON.
pub fn descriptor(version: &str) -> Value {
    let amount = json!({"type": ["string", "number"]});
    json!({
        "service": "pricing",
        "version": version,
        "contract_version": "1.0.0",
        "description": "Purchase-order pricing from the tenant's price list, discounts and tax rate",
        "config_schema": {
            "type": "object",
            "additionalProperties": false,
            "properties": {
                "currency": {"type": "string"},
                "tax_rate": amount,
                "prices": {"type": "object", "additionalProperties": amount},
                "discounts": {"type": "array", "items": {
                    "type": "object",
                    "required": ["min_quantity", "percent"],
                    "additionalProperties": false,
                    "properties": {"min_quantity": amount, "percent": amount},
                }},
            },
        },
        "actions": [
            {
                "name": "quote",
                "description": "Prices order lines: line totals, quantity discounts, tax and grand total",
                "input_schema": {
                    "type": "object",
                    "required": ["lines"],
                    "properties": {"lines": {"type": "array", "items": {
                        "type": "object",
                        "required": ["sku", "quantity"],
                        "properties": {"sku": {"type": "string"}, "quantity": amount},
                    }}},
                },
                "output_schema": {"type": "object"},
                "permission": "pricing.quote",
                "idempotent": true,
                "compensation": null,
            },
            {
                "name": "prices",
                "description": "The tenant's price list",
                "input_schema": {"type": "object"},
                "output_schema": {"type": "object"},
                "permission": "pricing.prices",
                "idempotent": true,
                "compensation": null,
            },
        ],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list() -> PriceList {
        PriceList::from_config(&json!({
            "currency": "EUR",
            "tax_rate": "0.19",
            "prices": {"BOLT": "0.35", "PANEL": "12.345"},
            "discounts": [{"min_quantity": "100", "percent": "5"}, {"min_quantity": 1000, "percent": "10"}],
        }))
        .expect("valid config")
    }

    #[test]
    fn quotes_in_exact_decimals_rounding_half_up() {
        let q = list()
            .quote(&json!({"lines": [
                {"sku": "BOLT", "quantity": "120"},
                {"sku": "PANEL", "quantity": 0.0005},
            ]}))
            .expect("quote");
        // 12.345 → 12.35 (half-up); 0.0005 → 0.001; 0.001 × 12.35 = 0.01235 → 0.01.
        assert_eq!(q["lines"][1]["unit_price"], "12.35");
        assert_eq!(q["lines"][1]["quantity"], "0.001");
        assert_eq!(q["lines"][1]["net"], "0.01");
        // 120 × 0.35 = 42.00, 5% off = 2.10.
        assert_eq!(q["lines"][0]["gross"], "42.00");
        assert_eq!(q["lines"][0]["discount"], "2.10");
        assert_eq!(q["subtotal"], "39.91");
        // 39.91 × 0.19 = 7.5829 → 7.58.
        assert_eq!(q["tax"], "7.58");
        assert_eq!(q["total"], "47.49");
    }

    #[test]
    fn the_highest_tier_reached_applies() {
        let q = list()
            .quote(&json!({"lines": [{"sku": "BOLT", "quantity": 1000}]}))
            .expect("quote");
        assert_eq!(q["lines"][0]["discount_percent"], "10");
        assert_eq!(q["lines"][0]["net"], "315.00");
    }

    #[test]
    fn bad_lines_name_where() {
        let l = list();
        let err = |p: Value| l.quote(&p).expect_err("refused").to_string();
        assert_eq!(
            err(json!({"lines": []})),
            "lines: an order needs at least one line"
        );
        assert_eq!(
            err(json!({"lines": [{"sku": "BOLT", "quantity": 1}, {"sku": "NUT", "quantity": 1}]})),
            "lines[1].sku: 'NUT' is not in this price list"
        );
        assert_eq!(
            err(json!({"lines": [{"sku": "BOLT", "quantity": "-1"}]})),
            "lines[0].quantity: -1 is out of range (more than 0, at most 1000000000)"
        );
        assert!(
            err(json!({"lines": [{"sku": "BOLT", "quantity": "x"}]}))
                .starts_with("lines[0].quantity: 'x' is not a decimal number")
        );
    }

    #[test]
    fn bad_config_names_the_field() {
        let err = PriceList::from_config(&json!({"prices": {"A": "-1"}})).expect_err("refused");
        assert_eq!(
            err.to_string(),
            "config.prices.A: a price cannot be negative"
        );
        let err =
            PriceList::from_config(&json!({"discounts": [{"percent": 5}]})).expect_err("refused");
        assert_eq!(
            err.to_string(),
            "config.discounts[0].min_quantity is required"
        );
    }
}
