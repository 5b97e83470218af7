//! The order's two state machines, as data: which actions each (status, amendment) allows.
//!
//! ```text
//! status:     PENDING_APPROVAL --approve--> OPEN --seller_confirm--> CONFIRMED
//!             OPEN --update (rules ask)--> PENDING_APPROVAL
//!             OPEN --approve_changes(approve)--> CONFIRMED
//!             PENDING_APPROVAL | OPEN | CONFIRMED --cancel--> CANCELLED
//! amendment:  NONE | REJECTED --propose_changes--> PROPOSED --approve_changes--> APPROVED | REJECTED
//! ```

use providers_core::ProviderError;

use super::Order;

/// An order's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum State {
    PendingApproval,
    Open,
    Confirmed,
    Cancelled,
}

impl State {
    pub(super) const ALL: [State; 4] = [
        State::PendingApproval,
        State::Open,
        State::Confirmed,
        State::Cancelled,
    ];

    pub(super) fn as_str(self) -> &'static str {
        match self {
            State::PendingApproval => "PENDING_APPROVAL",
            State::Open => "OPEN",
            State::Confirmed => "CONFIRMED",
            State::Cancelled => "CANCELLED",
        }
    }

    pub(super) fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

/// Where the seller's proposal stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Amendment {
    None,
    Proposed,
    Approved,
    Rejected,
}

impl Amendment {
    pub(super) const ALL: [Amendment; 4] = [
        Amendment::None,
        Amendment::Proposed,
        Amendment::Approved,
        Amendment::Rejected,
    ];

    pub(super) fn as_str(self) -> &'static str {
        match self {
            Amendment::None => "NONE",
            Amendment::Proposed => "PROPOSED",
            Amendment::Approved => "APPROVED",
            Amendment::Rejected => "REJECTED",
        }
    }

    pub(super) fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

/// The side of an order a company is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Party {
    Buyer,
    Seller,
}

/// Who may take `action`.
pub(super) fn party_of(action: &str) -> Party {
    match action {
        "seller_confirm" | "propose_changes" => Party::Seller,
        _ => Party::Buyer,
    }
}

/// The changing actions allowed in a state, in a stable order.
pub(super) fn allowed(status: State, amendment: Amendment) -> &'static [&'static str] {
    match (status, amendment) {
        (State::PendingApproval, _) => &["update", "approve", "cancel"],
        (State::Open, Amendment::Proposed) => &["approve_changes", "cancel"],
        (State::Open, _) => &["update", "seller_confirm", "propose_changes", "cancel"],
        (State::Confirmed, _) => &["cancel"],
        (State::Cancelled, _) => &[],
    }
}

/// CONFLICT unless `action` is allowed in the order's current state; the error names the
/// state and what it allows.
pub(super) fn check(order: &Order, action: &str) -> Result<(), ProviderError> {
    let allowed = allowed(order.status, order.amendment);
    if allowed.contains(&action) {
        return Ok(());
    }
    Err(ProviderError::conflict(format!(
        "purchase order '{}' is {} with amendment {}; {action} is not allowed there (allowed: {})",
        order.po_number,
        order.status.as_str(),
        order.amendment.as_str(),
        if allowed.is_empty() {
            "nothing, it is final".to_owned()
        } else {
            allowed.join(", ")
        }
    )))
}
