//! The identifier's format and its check characters (ISO/IEC 7064, MOD 1271-36).
//!
//! `{PREFIX}-{TENANT}-{PLANT}-{TYPE}-{SEQUENCE}-{CHECK}`, e.g. `UID-SAIF-KOL-RM-000001-A7`. The
//! two check characters are computed over every other character without the dashes. MOD
//! 1271-36 is a pure system with radix 36: a single substitution changes the weighted sum by
//! `d × 36^k` and an adjacent transposition by `d × 35 × 36^k` (0 < |d| < 36), and neither is a
//! multiple of 1271 = 31 × 41, so both are always caught.

/// The fixed prefix.
pub const PREFIX: &str = "UID";
const MODULUS: u32 = 1271;
const RADIX: u32 = 36;
/// Sequences are six digits.
pub const MAX_SEQUENCE: i64 = 999_999;

fn value(c: char) -> Option<u32> {
    c.to_digit(36)
        .filter(|_| c.is_ascii_digit() || c.is_ascii_uppercase())
}

fn character(v: u32) -> char {
    std::char::from_digit(v, 36)
        .unwrap_or('0')
        .to_ascii_uppercase()
}

/// The two check characters of `body` (its alphanumerics; dashes are skipped).
pub fn check(body: &str) -> Option<String> {
    let mut p = 0u32;
    for c in body.chars().filter(|c| *c != '-') {
        p = ((p + value(c)?) * RADIX) % MODULUS;
    }
    // Room for the two check characters: one more multiplication by the radix.
    p = (p * RADIX) % MODULUS;
    let c = (MODULUS + 1 - p) % MODULUS;
    Some(format!("{}{}", character(c / RADIX), character(c % RADIX)))
}

/// Whether `body` followed by `check` satisfies MOD 1271-36.
pub fn verifies(body: &str, check: &str) -> bool {
    let mut p = 0u32;
    for c in body.chars().filter(|c| *c != '-').chain(check.chars()) {
        match value(c) {
            Some(v) => p = ((p + v) * RADIX) % MODULUS,
            None => return false,
        }
    }
    // With the check characters the recursive sum lands on 1 (times the radix once more).
    p == RADIX % MODULUS
}

/// The identifier for these parts, check characters included.
pub fn format(tenant: &str, plant: &str, kind: &str, sequence: i64) -> String {
    let body = format!("{PREFIX}-{tenant}-{plant}-{kind}-{sequence:06}");
    let check = check(&body).unwrap_or_default();
    format!("{body}-{check}")
}

/// An identifier taken apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parts {
    /// The tenant code.
    pub tenant: String,
    /// The plant code.
    pub plant: String,
    /// The type code.
    pub kind: String,
    /// The sequence number.
    pub sequence: i64,
}

/// What is wrong with one part of a string offered as an identifier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// `format`, `prefix`, `tenant`, `plant`, `type`, `sequence` or `checksum`.
    pub part: &'static str,
    /// Why.
    pub reason: String,
}

fn problem(part: &'static str, reason: impl Into<String>) -> Problem {
    Problem {
        part,
        reason: reason.into(),
    }
}

/// Takes `text` apart and checks its syntax and check characters (not whether the plant or
/// type is configured: the caller knows those).
pub fn parse(text: &str) -> Result<Parts, Vec<Problem>> {
    let pieces: Vec<&str> = text.split('-').collect();
    if pieces.len() != 6 {
        return Err(vec![problem(
            "format",
            format!(
                "expected 6 parts PREFIX-TENANT-PLANT-TYPE-SEQUENCE-CHECK separated by '-', found {}",
                pieces.len()
            ),
        )]);
    }
    let mut problems = Vec::new();
    let alnum = |s: &str| {
        s.chars()
            .all(|c| c.is_ascii_digit() || c.is_ascii_uppercase())
    };
    if pieces[0] != PREFIX {
        problems.push(problem(
            "prefix",
            format!("'{}' is not '{PREFIX}'", pieces[0]),
        ));
    }
    if pieces[1].len() != 4 || !alnum(pieces[1]) {
        problems.push(problem(
            "tenant",
            format!("'{}' is not 4 characters of A-Z and 0-9", pieces[1]),
        ));
    }
    if pieces[2].len() != 3 || !alnum(pieces[2]) {
        problems.push(problem(
            "plant",
            format!("'{}' is not 3 characters of A-Z and 0-9", pieces[2]),
        ));
    }
    if !(2..=3).contains(&pieces[3].len()) || !alnum(pieces[3]) {
        problems.push(problem(
            "type",
            format!("'{}' is not 2 or 3 characters of A-Z and 0-9", pieces[3]),
        ));
    }
    let sequence = if pieces[4].len() == 6 && pieces[4].chars().all(|c| c.is_ascii_digit()) {
        pieces[4].parse::<i64>().ok().filter(|n| *n > 0)
    } else {
        None
    };
    if sequence.is_none() {
        problems.push(problem(
            "sequence",
            format!("'{}' is not 6 digits from 000001", pieces[4]),
        ));
    }
    if pieces[5].len() != 2 || !alnum(pieces[5]) {
        problems.push(problem(
            "checksum",
            format!("'{}' is not 2 characters of A-Z and 0-9", pieces[5]),
        ));
    } else if problems.is_empty() {
        let body = pieces[..5].join("-");
        if !verifies(&body, pieces[5]) {
            problems.push(problem(
                "checksum",
                format!(
                    "'{}' does not match the rest (a character is wrong or two are swapped)",
                    pieces[5]
                ),
            ));
        }
    }
    if problems.is_empty() {
        Ok(Parts {
            tenant: pieces[1].to_owned(),
            plant: pieces[2].to_owned(),
            kind: pieces[3].to_owned(),
            sequence: sequence.unwrap_or(0),
        })
    } else {
        Err(problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_parses_back() {
        let uid = format("SAIF", "KOL", "RM", 1);
        assert!(uid.starts_with("UID-SAIF-KOL-RM-000001-"), "{uid}");
        assert_eq!(
            parse(&uid).unwrap(),
            Parts {
                tenant: "SAIF".into(),
                plant: "KOL".into(),
                kind: "RM".into(),
                sequence: 1
            }
        );
    }

    #[test]
    fn the_check_verifies_only_its_own_body() {
        let body = "UID-SAIF-KOL-RM-000001";
        let c = check(body).unwrap();
        assert!(verifies(body, &c));
        assert!(!verifies("UID-SAIF-KOL-RM-000002", &c));
    }
}
