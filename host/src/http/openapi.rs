//! `GET /openapi.json`, generated from the descriptors of the configured services.

use serde_json::{Map, Value, json};

use crate::config::Config;

/// An OpenAPI 3.1 document: one operation per configured action, its request body the
/// action's input schema and its `data` the output schema (3.1 speaks JSON Schema natively).
pub fn document(config: &Config) -> Value {
    let mut paths = Map::new();
    for (service, plan) in &config.services {
        let d = plan.factory.descriptor();
        for action in &d.actions {
            let mut description = action.description.clone();
            description.push_str(&format!(
                "\n\nPermission: `{}`. Idempotent: {}.",
                action.permission, action.idempotent
            ));
            if let Some(c) = &action.compensation {
                description.push_str(&format!(" Compensated by `{c}`."));
            }
            paths.insert(
                format!("/providers/{service}/{}", action.name),
                json!({"post": {
                    "operationId": format!("{service}.{}", action.name),
                    "tags": [service],
                    "summary": action.description,
                    "description": description,
                    "security": [{"bearer": []}],
                    "requestBody": {"required": true, "content": {"application/json": {"schema": action.input_schema}}},
                    "responses": {
                        "200": {"description": "The action's result.", "content": {"application/json": {"schema": {
                            "type": "object",
                            "required": ["data", "request_id"],
                            "properties": {"data": action.output_schema, "request_id": {"type": "string"}}
                        }}}},
                        "default": {"$ref": "#/components/responses/Error"}
                    }
                }}),
            );
        }
    }
    let plain = |summary: &str| json!({"get": {"summary": summary, "responses": {"200": {"description": "OK"}, "default": {"$ref": "#/components/responses/Error"}}}});
    paths.insert(
        "/providers".into(),
        plain("Services the caller's tenant can call, with versions and status."),
    );
    paths.insert("/providers/{service}".into(), {
        let mut p = plain("One service: version, status and action schemas.");
        p["get"]["parameters"] = json!([{"name": "service", "in": "path", "required": true, "schema": {"type": "string"}}]);
        p
    });
    paths.insert("/health".into(), plain("The process is alive."));
    paths.insert(
        "/ready".into(),
        plain("Storage is reachable and required providers are not failed."),
    );
    let codes: Vec<&str> = providers_core::ErrorCode::ALL
        .iter()
        .map(|c| c.as_str())
        .collect();
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "ERP Provider Layer",
            "version": env!("CARGO_PKG_VERSION"),
            "description": format!("Providers served by this host (contract {}).", providers_core::CONTRACT_VERSION),
        },
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
            "schemas": {"Error": {
                "type": "object",
                "required": ["error_code", "detail", "request_id", "timestamp"],
                "properties": {
                    "error_code": {"type": "string", "enum": codes},
                    "detail": {"type": "string"},
                    "request_id": {"type": "string"},
                    "timestamp": {"type": "string", "format": "date-time"}
                }
            }},
            "responses": {"Error": {"description": "An error in the one error shape.", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}}
        }
    })
}
