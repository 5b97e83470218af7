//! Definitions parsed from TOML: what is accepted and where each mistake is reported.

mod definitions;
