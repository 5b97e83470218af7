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
    paths.insert("/openapi.json".into(), plain("This document."));
    paths.insert(
        "/metrics".into(),
        plain("Every metric in the Prometheus text format: a platform operator's token unless [observability] metrics = \"open\" (loopback listeners only)."),
    );
    paths.insert(
        "/ready".into(),
        plain("Storage is reachable and required providers are not failed."),
    );
    admin_paths(&mut paths);
    auth_paths(&mut paths);
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

/// The `/admin` routes: platform operators and tenant administrators (`[security] admin_role`).
fn admin_paths(paths: &mut Map<String, Value>) {
    let param = |name: &str| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}});
    let op = |method: &str, id: &str, summary: &str, params: Vec<Value>, body: Option<Value>| {
        let mut o = json!({
            "operationId": id,
            "tags": ["admin"],
            "summary": summary,
            "security": [{"bearer": []}],
            "parameters": params,
            "responses": {
                "200": {"description": "Done.", "content": {"application/json": {"schema": {"type": "object"}}}},
                "default": {"$ref": "#/components/responses/Error"}
            }
        });
        if let Some(b) = body {
            o["requestBody"] = b;
        }
        json!({ method: o })
    };
    let target = json!({"required": false, "content": {"application/json": {"schema": {
        "type": "object",
        "properties": {"tenant": {"type": "string", "description": "One tenant; absent: every tenant (platform operator) or your own (tenant administrator)."}},
        "additionalProperties": false
    }}}});
    paths.insert(
        "/admin/providers".into(),
        op("get", "admin.providers", "Every configured provider: version, kind, and per tenant its state, pause and instance.", vec![], None),
    );
    let query = |name: &str, kind: &str, what: &str| json!({"name": name, "in": "query", "required": false, "schema": {"type": kind}, "description": what});
    paths.insert(
        "/admin/audit".into(),
        op("get", "admin.audit", "One chain of the audit trail (a tenant's, oldest first): every provider call, admin request and refused credential, hash-chained. Tenant administrators read their own.", vec![
            query("tenant", "string", "The chain: a tenant, the platform tenant, or '-' (requests without a configured tenant). Default: your own tenant."),
            query("subject", "string", "One subject."),
            query("service", "string", "One service."),
            query("outcome", "string", "ok, denied or error."),
            query("kind", "string", "call, admin, authn or authz."),
            query("since_ms", "integer", "From this time (ms since the epoch)."),
            query("until_ms", "integer", "Before this time."),
            query("after", "integer", "Records after this sequence number: the previous page's next."),
            query("limit", "integer", "1 to 1000, default 100."),
        ], None),
    );
    paths.insert(
        "/admin/config/validate".into(),
        op("post", "admin.config.validate", "Checks a whole configuration (TOML body) and lists every error with line and column; applies nothing. Platform operators only.", vec![],
            Some(json!({"required": true, "content": {"application/toml": {"schema": {"type": "string"}}}}))),
    );
    paths.insert(
        "/admin/config/reload".into(),
        op("post", "admin.config.reload", "Reads the configuration and plugin folders again and applies only the difference; an invalid configuration is refused whole (422). Platform operators only.", vec![], None),
    );
    paths.insert(
        "/admin/plugins/reload".into(),
        op("post", "admin.plugins.reload", "The same as /admin/config/reload: plugins whose file changed are loaded again, their instances replaced.", vec![], None),
    );
    for (verb, summary) in [
        (
            "pause",
            "Pauses a provider for one tenant or all: calls answer 503 until resumed. Kept across restarts.",
        ),
        ("resume", "Resumes a paused provider."),
        (
            "restart",
            "Restarts a provider's instances: each new one connects before it takes over.",
        ),
    ] {
        paths.insert(
            format!("/admin/providers/{{service}}/{verb}"),
            op(
                "post",
                &format!("admin.providers.{verb}"),
                summary,
                vec![param("service")],
                Some(target.clone()),
            ),
        );
    }
    paths.insert(
        "/admin/instances".into(),
        op("get", "admin.instances", "Every live instance (a tenant administrator's own tenant's): tenant, service, version, kind, state, the provider's own status, when it connected, calls, errors, calls in flight, last error, or why its last connect failed.", vec![], None),
    );
    let mut clients = op(
        "get",
        "admin.clients.list",
        "The token service's clients (never their secrets): a tenant administrator's own tenant's, a platform operator's every tenant's.",
        vec![query("tenant", "string", "One tenant.")],
        None,
    );
    clients["post"] = op("post", "admin.clients.add", "Creates a client of the token service; its secret is in this answer only (201). A tenant administrator creates clients of their own tenant.", vec![],
        Some(json!({"required": true, "content": {"application/json": {"schema": {
            "type": "object",
            "required": ["roles"],
            "properties": {
                "tenant": {"type": "string", "description": "The tenant its tokens are for; a tenant administrator's own when absent."},
                "subject": {"type": "string", "description": "Its tokens' sub (default: the client id)."},
                "roles": {"type": "array", "items": {"type": "string"}, "description": "Its tokens' roles, each defined in [security.roles]."},
                "company_id": {"type": "string", "description": "Its tokens' company_id."}
            },
            "additionalProperties": false
        }}}})))["post"].take();
    paths.insert("/admin/clients".into(), clients);
    paths.insert(
        "/admin/clients/{client_id}/revoke".into(),
        op("post", "admin.clients.revoke", "Revokes a client and every refresh token it holds (another tenant's client is not found).", vec![param("client_id")], None),
    );
    for (verb, summary) in [
        ("enable", "Enables a tenant's service again after disable."),
        (
            "disable",
            "Hides a service from a tenant (404 as if not enabled). Kept across restarts.",
        ),
    ] {
        paths.insert(
            format!("/admin/tenants/{{tenant}}/services/{{service}}/{verb}"),
            op(
                "post",
                &format!("admin.tenants.{verb}"),
                summary,
                vec![param("tenant"), param("service")],
                None,
            ),
        );
    }
}

/// The token service (OAuth2 client credentials, RFC 6749 §4.4) and its public keys.
fn auth_paths(paths: &mut Map<String, Value>) {
    let form = |props: Value, required: &[&str]| {
        json!({"required": true, "content": {
            "application/x-www-form-urlencoded": {"schema": {"type": "object", "properties": props, "required": required}},
            "application/json": {"schema": {"type": "object", "properties": props, "required": required}}
        }})
    };
    let granted = json!({"description": "An access token and a refresh token.", "content": {"application/json": {"schema": {
        "type": "object",
        "properties": {
            "access_token": {"type": "string"}, "token_type": {"const": "Bearer"}, "expires_in": {"type": "integer"},
            "refresh_token": {"type": "string"}, "refresh_expires_in": {"type": "integer"}
        }
    }}}});
    let oauth_error = json!({"description": "An OAuth2 error: error (invalid_request, invalid_client, invalid_grant, unsupported_grant_type, rate_limited), error_description, error_code, request_id."});
    let s = |v: &str| json!({"type": "string", "description": v});
    paths.insert("/auth/token".into(), json!({"post": {
        "operationId": "auth.token",
        "tags": ["auth"],
        "summary": "Client credentials grant: a short-lived access token and a refresh token. Credentials in the body or HTTP Basic. Rate-limited per client and overall.",
        "security": [],
        "requestBody": form(json!({
            "grant_type": s("client_credentials (or refresh_token, as /auth/refresh)"),
            "client_id": s("The client's id (or HTTP Basic)."),
            "client_secret": s("The client's secret (or HTTP Basic)."),
            "refresh_token": s("With grant_type=refresh_token.")
        }), &["grant_type"]),
        "responses": {"200": granted.clone(), "default": oauth_error.clone()}
    }}));
    paths.insert("/auth/refresh".into(), json!({"post": {
        "operationId": "auth.refresh",
        "tags": ["auth"],
        "summary": "Spends a refresh token for a new access token and the next refresh token of its family; a spent token used again revokes the whole family.",
        "security": [],
        "requestBody": form(json!({"refresh_token": s("The latest refresh token of the family.")}), &["refresh_token"]),
        "responses": {"200": granted, "default": oauth_error}
    }}));
    paths.insert("/.well-known/jwks.json".into(), json!({"get": {
        "operationId": "auth.jwks",
        "tags": ["auth"],
        "summary": "The public keys (RS256) this host's tokens are signed with, as a JWK Set; 404 when it signs with a shared secret only.",
        "security": [],
        "responses": {"200": {"description": "A JWK Set (RFC 7517)."}, "default": {"$ref": "#/components/responses/Error"}}
    }}));
}
