//! Trusted issuers and exchange policies, compiled from `[token_exchange]` (pure: no I/O).
//!
//! [`compile`] turns the configuration into [`IssuerSettings`] and [`Policy`]s and refuses, with
//! the configuration key to blame, anything that would make the exchange unsafe:
//!
//! - an issuer listed twice, an `iss` that is not an `https://` URL when its keys must be
//!   fetched, an empty `audience`, an algorithm that is not an asymmetric JWS algorithm
//!   (`none` and `HS*` are refused by name), an inline `jwks` without a usable key;
//! - a policy naming no configured issuer, a SPIFFE ID template outside this trust domain or
//!   with a placeholder in the trust domain, a condition that does not compile, is longer than
//!   [`MAX_CONDITION_LEN`] bytes or larger than [`MAX_CONDITION_NODES`] nodes, or that does not
//!   **pin an immutable claim**.
//!
//! # Pinning
//!
//! A condition pins claim `c` when one of its top-level conjuncts (the operands of `&&` at the
//! root) is `claims.c == <literal>`, `<literal> == claims.c`, `claims.c in [<literals>]`, or an
//! `||` of such comparisons. A condition must pin at least one of its issuer's immutable claims:
//! the preset's (`repository_id`, `repository_owner_id` for GitHub Actions; `project_id`,
//! `namespace_id` for GitLab CI; the service account's or pod's UID for Kubernetes) plus the
//! issuer's `immutable_claims` (for a generic issuer, `sub` when none are listed). A condition
//! that only checks the audience, or only names (`repository`, `project_path`, a namespace
//! name), which their owners can rename and someone else can then take, is refused at load.
//!
//! Claims are addressed as `claims.a.b` or `claims["kubernetes.io"].pod.uid`; the pinned path
//! is the dotted join (`kubernetes.io.pod.uid`).

use std::collections::BTreeSet;
use std::time::Duration;

use cel::common::ast::{Expr, LiteralValue};
use serde_json::{Map, Value};
use tessera_spiffe::jwt::JwsAlgorithm;
use tessera_spiffe::{SpiffeId, TrustDomain};

use super::jwks::{KeySet, parse_jwks};
use crate::config::{ExchangePolicyConfig, IssuerPreset, ServerConfig, TrustedIssuerConfig};

/// Longest condition accepted, in bytes.
pub const MAX_CONDITION_LEN: usize = 4096;
/// Most nodes a compiled condition may have.
pub const MAX_CONDITION_NODES: usize = 512;
/// Longest claim value put into a SPIFFE ID.
pub const MAX_SEGMENT_LEN: usize = 255;
/// Claims every JWT carries that identify nothing.
const REGISTERED_CLAIMS: &[&str] = &["aud", "iss", "exp", "iat", "nbf", "jti"];

/// An issuer's validation settings.
#[derive(Debug, Clone)]
pub struct IssuerSettings {
    /// The exact `iss`.
    pub issuer: String,
    /// `jwks_uri` as configured.
    pub jwks_uri: Option<url::Url>,
    /// The inline JWKS, when configured.
    pub inline_keys: Option<KeySet>,
    /// Algorithms accepted.
    pub algorithms: Vec<JwsAlgorithm>,
    /// The `aud` required.
    pub audience: String,
    /// Clock skew allowed.
    pub leeway: Duration,
    /// Longest `exp - iat`.
    pub max_token_lifetime: Duration,
    /// Whether a token without `jti` is refused.
    pub require_jti: bool,
    /// Claims a condition may pin.
    pub immutable_claims: BTreeSet<String>,
}

/// A compiled exchange policy.
#[derive(Debug)]
pub struct Policy {
    /// Its name.
    pub name: String,
    /// The `iss` it applies to.
    pub issuer: String,
    template: SpiffeIdTemplate,
    condition: cel::Program,
    /// Longest X.509-SVID it issues.
    pub x509_svid_ttl: Duration,
    /// Longest JWT-SVID it issues.
    pub jwt_svid_ttl: Duration,
}

/// Everything `[token_exchange]` configures, checked.
#[derive(Debug)]
pub struct Compiled {
    /// The trusted issuers, in configuration order.
    pub issuers: Vec<IssuerSettings>,
    /// The policies, in configuration order (the first whose condition holds is applied).
    pub policies: Vec<Policy>,
}

/// The immutable claims of a preset.
pub fn preset_claims(preset: IssuerPreset) -> &'static [&'static str] {
    match preset {
        IssuerPreset::Generic => &[],
        IssuerPreset::GithubActions => &["repository_id", "repository_owner_id"],
        IssuerPreset::GitlabCi => &["project_id", "namespace_id"],
        IssuerPreset::Kubernetes => &["kubernetes.io.serviceaccount.uid", "kubernetes.io.pod.uid"],
    }
}

/// The configuration keys an issuer table's errors name, so one set of checks serves
/// `[[token_exchange.issuer]]`, `[[node_attestor.k8s_psat.cluster]]` and
/// `[[node_attestor.oidc.issuer]]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IssuerKeys {
    /// The table, as written in the file (`[[token_exchange.issuer]]`).
    pub table: &'static str,
    /// `issuer`.
    pub issuer: &'static str,
    /// `jwks_uri`.
    pub jwks_uri: &'static str,
    /// `jwks`.
    pub jwks: &'static str,
    /// `ca_bundle_path`.
    pub ca_bundle_path: &'static str,
    /// `allowed_algorithms`.
    pub allowed_algorithms: &'static str,
    /// `audience`.
    pub audience: &'static str,
    /// `immutable_claims`.
    pub immutable_claims: &'static str,
}

/// `[[token_exchange.issuer]]`.
pub const EXCHANGE_ISSUER_KEYS: IssuerKeys = IssuerKeys {
    table: "[[token_exchange.issuer]]",
    issuer: "token_exchange.issuer.issuer",
    jwks_uri: "token_exchange.issuer.jwks_uri",
    jwks: "token_exchange.issuer.jwks",
    ca_bundle_path: "token_exchange.issuer.ca_bundle_path",
    allowed_algorithms: "token_exchange.issuer.allowed_algorithms",
    audience: "token_exchange.issuer.audience",
    immutable_claims: "token_exchange.issuer.immutable_claims",
};

/// Checks and compiles `[token_exchange]`; the error names the key to blame.
pub fn compile(config: &ServerConfig) -> Result<Compiled, (&'static str, String)> {
    let exchange = &config.token_exchange;
    let issuers = compile_issuers(&exchange.issuer, &EXCHANGE_ISSUER_KEYS)?;
    let mut policies: Vec<Policy> = Vec::new();
    for (index, policy) in exchange.policy.iter().enumerate() {
        let fail = |(key, message): (&'static str, String)| {
            (key, format!("policy {:?} ([[token_exchange.policy]] #{}): {message}", policy.name, index + 1))
        };
        if policy.name.is_empty() || policy.name.len() > 128 {
            return Err(fail(("token_exchange.policy.name", "must be 1 to 128 characters".into())));
        }
        if policies.iter().any(|known| known.name == policy.name) {
            return Err(fail(("token_exchange.policy.name", "is used by another policy".into())));
        }
        let Some(issuer) = issuers.iter().find(|issuer| issuer.issuer == policy.issuer) else {
            return Err(fail((
                "token_exchange.policy.issuer",
                format!("{:?} is not the issuer of any [[token_exchange.issuer]]", policy.issuer),
            )));
        };
        policies.push(compile_policy(policy, issuer, config).map_err(fail)?);
    }
    Ok(Compiled { issuers, policies })
}

/// Checks a list of issuer tables: each on its own ([`compile_issuer`]) and no `iss` twice.
pub fn compile_issuers(
    configs: &[TrustedIssuerConfig],
    keys: &IssuerKeys,
) -> Result<Vec<IssuerSettings>, (&'static str, String)> {
    let mut issuers: Vec<IssuerSettings> = Vec::new();
    for (index, issuer) in configs.iter().enumerate() {
        let settings = compile_issuer(issuer, keys).map_err(|(key, message)| {
            (key, format!("issuer {:?} ({} #{}): {message}", issuer.issuer, keys.table, index + 1))
        })?;
        if issuers.iter().any(|known| known.issuer == settings.issuer) {
            return Err((keys.issuer, format!("{:?} is listed twice", settings.issuer)));
        }
        issuers.push(settings);
    }
    Ok(issuers)
}

/// Checks one issuer table; errors name the key of `keys`.
pub fn compile_issuer(
    config: &TrustedIssuerConfig,
    keys: &IssuerKeys,
) -> Result<IssuerSettings, (&'static str, String)> {
    if config.issuer.is_empty() || config.issuer.len() > 1024 {
        return Err((keys.issuer, "must be 1 to 1024 characters".into()));
    }
    if config.issuer.chars().any(char::is_control) {
        return Err((keys.issuer, "must not contain control characters".into()));
    }
    let inline_keys = match &config.jwks {
        Some(text) => Some(parse_jwks(text.as_bytes()).map_err(|message| (keys.jwks, message))?),
        None => None,
    };
    if inline_keys.is_some() && config.jwks_uri.is_some() {
        return Err((keys.jwks_uri, "give either jwks_uri or an inline jwks, not both".into()));
    }
    let jwks_uri = match &config.jwks_uri {
        Some(uri) => {
            crate::federation::check_url(uri).map_err(|message| (keys.jwks_uri, message))?;
            Some(url::Url::parse(uri).map_err(|err| (keys.jwks_uri, err.to_string()))?)
        }
        None => None,
    };
    if inline_keys.is_none() && jwks_uri.is_none() {
        // Keys come from OIDC discovery under the issuer URL.
        crate::federation::check_url(&config.issuer).map_err(|message| {
            (keys.issuer, format!("{message} (OIDC discovery needs an https:// issuer; or set jwks_uri or jwks)"))
        })?;
    }
    if config.audience.is_empty() {
        return Err((keys.audience, "must not be empty".into()));
    }
    if config.allowed_algorithms.is_empty() {
        return Err((keys.allowed_algorithms, "must list at least one algorithm".into()));
    }
    let mut algorithms = Vec::new();
    for name in &config.allowed_algorithms {
        if name.eq_ignore_ascii_case("none") || name.to_ascii_uppercase().starts_with("HS") {
            return Err((
                keys.allowed_algorithms,
                format!("{name:?} is never accepted: tokens must be signed with an asymmetric key"),
            ));
        }
        let algorithm: JwsAlgorithm = name.parse().map_err(|_| {
            (
                keys.allowed_algorithms,
                format!("{name:?} is not one of RS256, RS384, RS512, ES256, ES384, PS256, PS384, PS512"),
            )
        })?;
        if algorithm == JwsAlgorithm::Es512 {
            return Err((keys.allowed_algorithms, "ES512 cannot be verified by this server".into()));
        }
        algorithms.push(algorithm);
    }
    let mut immutable_claims: BTreeSet<String> = preset_claims(config.preset).iter().map(|c| (*c).to_owned()).collect();
    for claim in &config.immutable_claims {
        if claim.is_empty() || REGISTERED_CLAIMS.contains(&claim.as_str()) {
            return Err((
                keys.immutable_claims,
                format!("{claim:?} identifies no subject (aud, iss, exp, iat, nbf and jti cannot be pinned)"),
            ));
        }
        immutable_claims.insert(claim.clone());
    }
    if immutable_claims.is_empty() {
        immutable_claims.insert("sub".to_owned());
    }
    Ok(IssuerSettings {
        issuer: config.issuer.clone(),
        jwks_uri,
        inline_keys,
        algorithms,
        audience: config.audience.clone(),
        leeway: config.leeway,
        max_token_lifetime: config.max_token_lifetime,
        require_jti: config.require_jti,
        immutable_claims,
    })
}

fn compile_policy(
    config: &ExchangePolicyConfig,
    issuer: &IssuerSettings,
    server: &ServerConfig,
) -> Result<Policy, (&'static str, String)> {
    let template = SpiffeIdTemplate::parse(&config.spiffe_id, &server.trust_domain)
        .map_err(|message| ("token_exchange.policy.spiffe_id", message))?;
    if template.sample().is_ok_and(|sample| crate::ca::is_reserved_id(&sample)) {
        return Err((
            "token_exchange.policy.spiffe_id",
            format!(
                "{:?} lies in the reserved {} namespace of the server's and agents' own identities",
                config.spiffe_id,
                crate::ca::RESERVED_PATH
            ),
        ));
    }
    let condition = compile_condition(&config.condition, &issuer.immutable_claims)
        .map_err(|message| ("token_exchange.policy.condition", message))?;
    Ok(Policy {
        name: config.name.clone(),
        issuer: config.issuer.clone(),
        template,
        condition,
        x509_svid_ttl: config.x509_svid_ttl.unwrap_or(server.default_x509_svid_ttl),
        jwt_svid_ttl: config.jwt_svid_ttl.unwrap_or(server.default_jwt_svid_ttl),
    })
}

/// Compiles a condition and checks its size and that it pins one of `immutable`.
pub fn compile_condition(source: &str, immutable: &BTreeSet<String>) -> Result<cel::Program, String> {
    if source.trim().is_empty() {
        return Err("must not be empty: a policy needs a condition that pins an immutable claim".into());
    }
    if source.len() > MAX_CONDITION_LEN {
        return Err(format!("is {} bytes long; the limit is {MAX_CONDITION_LEN}", source.len()));
    }
    let program =
        cel::Program::compile(source).map_err(|err| format!("is not valid CEL: {}", one_line(&err.to_string())))?;
    let nodes = count_nodes(program.expression());
    if nodes > MAX_CONDITION_NODES {
        return Err(format!("has {nodes} expression nodes; the limit is {MAX_CONDITION_NODES}"));
    }
    let pinned = pinned_claims(program.expression());
    if !pinned.iter().any(|claim| immutable.contains(claim)) {
        let mut referenced = BTreeSet::new();
        referenced_claims(program.expression(), &mut referenced);
        let referenced: Vec<String> = referenced.into_iter().collect();
        let immutable: Vec<&str> = immutable.iter().map(String::as_str).collect();
        return Err(format!(
            "pins no immutable claim of its issuer (it refers to: {}); add a conjunct such as claims.{} == \"<value>\" \
             (immutable claims: {})",
            if referenced.is_empty() { "no claim".to_owned() } else { referenced.join(", ") },
            immutable.first().copied().unwrap_or("sub"),
            immutable.join(", ")
        ));
    }
    Ok(program)
}

fn one_line(text: &str) -> String {
    text.split('\n').map(str::trim).filter(|line| !line.is_empty()).collect::<Vec<_>>().join("; ")
}

/// The keys and values of map literal or struct entries.
fn entry_children(entries: &[cel::common::ast::IdedEntryExpr]) -> Vec<&cel::IdedExpr> {
    entries
        .iter()
        .flat_map(|entry| match &entry.expr {
            cel::common::ast::EntryExpr::MapEntry(e) => vec![&e.key, &e.value],
            cel::common::ast::EntryExpr::StructField(f) => vec![&f.value],
        })
        .collect()
}

/// The children of a node.
fn children(expr: &cel::IdedExpr) -> Vec<&cel::IdedExpr> {
    match &expr.expr {
        Expr::Call(call) => call.target.iter().map(|t| t.as_ref()).chain(call.args.iter()).collect(),
        Expr::Comprehension(c) => vec![&c.iter_range, &c.accu_init, &c.loop_cond, &c.loop_step, &c.result],
        Expr::List(list) => list.elements.iter().collect(),
        Expr::Map(map) => entry_children(&map.entries),
        Expr::Select(select) => vec![select.operand.as_ref()],
        Expr::Struct(s) => entry_children(&s.entries),
        _ => Vec::new(),
    }
}

fn count_nodes(expr: &cel::IdedExpr) -> usize {
    let mut count = 0;
    let mut stack = vec![expr];
    while let Some(node) = stack.pop() {
        count += 1;
        stack.extend(children(node));
    }
    count
}

/// `claims.a.b` / `claims["a"]["b"]` -> `a.b`.
fn claim_path(expr: &cel::IdedExpr) -> Option<String> {
    let mut segments = Vec::new();
    let mut node = expr;
    loop {
        match &node.expr {
            Expr::Ident(name) if name == "claims" => break,
            Expr::Select(select) if !select.test => {
                segments.push(select.field.clone());
                node = &select.operand;
            }
            Expr::Call(call) if call.func_name == "_[_]" && call.args.len() == 2 && call.target.is_none() => {
                let Expr::Literal(LiteralValue::String(key)) = &call.args[1].expr else { return None };
                segments.push(key.inner().to_owned());
                node = &call.args[0];
            }
            _ => return None,
        }
    }
    if segments.is_empty() {
        return None;
    }
    segments.reverse();
    Some(segments.join("."))
}

fn is_literal(expr: &cel::IdedExpr) -> bool {
    match &expr.expr {
        Expr::Literal(LiteralValue::Null) => false,
        Expr::Literal(_) => true,
        _ => false,
    }
}

/// The claims one comparison, or an `||` of comparisons, pins (all of its branches must pin).
fn pins_of(expr: &cel::IdedExpr) -> Option<BTreeSet<String>> {
    let Expr::Call(call) = &expr.expr else { return None };
    match (call.func_name.as_str(), call.args.as_slice()) {
        ("_==_", [left, right]) => {
            let path = match (claim_path(left), claim_path(right)) {
                (Some(path), None) if is_literal(right) => path,
                (None, Some(path)) if is_literal(left) => path,
                _ => return None,
            };
            Some(BTreeSet::from([path]))
        }
        ("@in", [needle, list]) => {
            let path = claim_path(needle)?;
            let Expr::List(list) = &list.expr else { return None };
            (!list.elements.is_empty() && list.elements.iter().all(is_literal)).then(|| BTreeSet::from([path]))
        }
        ("_||_", [left, right]) => {
            let (left, right) = (pins_of(left)?, pins_of(right)?);
            // Every branch must pin the same claim for the disjunction to pin it.
            let common: BTreeSet<String> = left.intersection(&right).cloned().collect();
            (!common.is_empty()).then_some(common)
        }
        _ => None,
    }
}

/// The claims the top-level conjuncts of a condition pin.
fn pinned_claims(expr: &cel::IdedExpr) -> BTreeSet<String> {
    let mut pinned = BTreeSet::new();
    let mut stack = vec![expr];
    while let Some(node) = stack.pop() {
        if let Expr::Call(call) = &node.expr
            && call.func_name == "_&&_"
        {
            stack.extend(call.args.iter());
            continue;
        }
        if let Some(pins) = pins_of(node) {
            pinned.extend(pins);
        }
    }
    pinned
}

fn referenced_claims(expr: &cel::IdedExpr, out: &mut BTreeSet<String>) {
    if let Some(path) = claim_path(expr) {
        out.insert(path);
        return;
    }
    for child in children(expr) {
        referenced_claims(child, out);
    }
}

impl Policy {
    /// Whether the condition is true for `claims` (an error, a non-boolean result or a panic
    /// inside the interpreter are all "no").
    pub fn matches(&self, claims: &Map<String, Value>) -> bool {
        condition_holds(&self.condition, claims)
    }

    /// The SPIFFE ID for `claims`, or why none can be made. Claims such as `tessera` and
    /// `server` must not make one of the deployment's own identities, so an ID in the reserved
    /// namespace is refused here (and the CA would refuse to sign it).
    pub fn spiffe_id(&self, claims: &Map<String, Value>) -> Result<SpiffeId, String> {
        let id = self.template.render(claims)?;
        if crate::ca::is_reserved_id(&id) {
            return Err(format!("{id} is in the reserved {} namespace", crate::ca::RESERVED_PATH));
        }
        Ok(id)
    }
}

/// Whether a compiled condition is true for `claims` (an error, a non-boolean result or a
/// panic inside the interpreter are all "no").
pub fn condition_holds(program: &cel::Program, claims: &Map<String, Value>) -> bool {
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let value = cel::to_value(claims).ok()?;
        let mut context = cel::Context::default();
        context.add_variable_from_value("claims", value);
        program.execute(&context).ok()
    }));
    matches!(outcome, Ok(Some(cel::Value::Bool(true))))
}

/// A SPIFFE ID with `{claim}` placeholders in its path.
#[derive(Debug, Clone)]
pub struct SpiffeIdTemplate {
    parts: Vec<TemplatePart>,
}

#[derive(Debug, Clone)]
enum TemplatePart {
    Literal(String),
    Claim(String),
}

impl SpiffeIdTemplate {
    /// Parses a template; it must start with `spiffe://<trust_domain>/` and give a SPIFFE ID
    /// once its placeholders are filled in.
    pub fn parse(template: &str, trust_domain: &TrustDomain) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            let literal = &rest[..open];
            if literal.contains('}') {
                return Err(format!("{template:?}: unbalanced '}}'"));
            }
            let after = &rest[open + 1..];
            let close = after.find('}').ok_or_else(|| format!("{template:?}: unclosed '{{'"))?;
            let name = &after[..close];
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) {
                return Err(format!("{template:?}: {{{name}}} is not a claim name (letters, digits, '.', '_', '-')"));
            }
            if !literal.is_empty() {
                parts.push(TemplatePart::Literal(literal.to_owned()));
            }
            parts.push(TemplatePart::Claim(name.to_owned()));
            rest = &after[close + 1..];
        }
        if rest.contains('}') {
            return Err(format!("{template:?}: unbalanced '}}'"));
        }
        if !rest.is_empty() {
            parts.push(TemplatePart::Literal(rest.to_owned()));
        }
        let prefix = format!("spiffe://{}/", trust_domain.name());
        match parts.first() {
            Some(TemplatePart::Literal(first)) if first.starts_with(&prefix) => {}
            _ => {
                return Err(format!(
                    "{template:?} must start with {prefix:?}: exchanged identities are in this trust domain, and \
                     placeholders go in the path"
                ));
            }
        }
        let template = Self { parts };
        template.sample()?;
        Ok(template)
    }

    /// The ID with every placeholder filled in with `x`: what the template's fixed parts
    /// make of an ordinary claim value.
    pub fn sample(&self) -> Result<SpiffeId, String> {
        let sample: String = self
            .parts
            .iter()
            .map(|part| match part {
                TemplatePart::Literal(text) => text.as_str(),
                TemplatePart::Claim(_) => "x",
            })
            .collect();
        SpiffeId::parse(&sample).map_err(|err| format!("{sample:?} (placeholders filled in) is not a SPIFFE ID: {err}"))
    }

    /// The text before the first placeholder (the whole template when it has none).
    pub fn literal_prefix(&self) -> &str {
        match self.parts.first() {
            Some(TemplatePart::Literal(text)) => text,
            _ => "",
        }
    }

    /// The SPIFFE ID for `claims`, or why none can be made.
    pub fn render(&self, claims: &Map<String, Value>) -> Result<SpiffeId, String> {
        let mut id = String::new();
        for part in &self.parts {
            match part {
                TemplatePart::Literal(text) => id.push_str(text),
                TemplatePart::Claim(name) => id.push_str(&segment_value(claims, name)?),
            }
        }
        SpiffeId::parse(&id).map_err(|err| format!("{id:?}: {err}"))
    }
}

/// Looks up a dotted claim path; a key may itself contain dots (`kubernetes.io.pod.uid` is
/// `claims["kubernetes.io"]["pod"]["uid"]`): the longest key that matches is taken first.
pub fn lookup_claim<'a>(claims: &'a Map<String, Value>, path: &str) -> Option<&'a Value> {
    if let Some(value) = claims.get(path) {
        return Some(value);
    }
    let mut cut = path.len();
    while let Some(dot) = path[..cut].rfind('.') {
        if let Some(Value::Object(inner)) = claims.get(&path[..dot])
            && let Some(value) = lookup_claim(inner, &path[dot + 1..])
        {
            return Some(value);
        }
        cut = dot;
    }
    None
}

/// A claim's value as one SPIFFE ID path segment: a string or an integer, of letters, digits,
/// `.`, `-`, `_`, not `.` or `..`.
fn segment_value(claims: &Map<String, Value>, name: &str) -> Result<String, String> {
    let text = match lookup_claim(claims, name) {
        None | Some(Value::Null) => return Err(format!("claim {name} is missing")),
        Some(Value::String(text)) => text.clone(),
        Some(Value::Number(number)) if number.is_i64() || number.is_u64() => number.to_string(),
        Some(_) => return Err(format!("claim {name} is not a string or an integer")),
    };
    let valid = !text.is_empty()
        && text.len() <= MAX_SEGMENT_LEN
        && text != "."
        && text != ".."
        && text.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if valid { Ok(text) } else { Err(format!("claim {name} is not a valid SPIFFE ID path segment")) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn claims(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            _ => panic!("not an object"),
        }
    }

    fn github() -> BTreeSet<String> {
        preset_claims(IssuerPreset::GithubActions).iter().map(|c| (*c).to_owned()).collect()
    }

    #[test]
    fn conditions_must_pin_an_immutable_claim() {
        let ok = [
            r#"claims.repository_id == "42""#,
            r#""42" == claims.repository_id && claims.ref == "refs/heads/main""#,
            r#"claims.ref == "refs/heads/main" && claims.repository_owner_id in ["7", "8"]"#,
            r#"claims["repository_id"] == "1" || claims.repository_id == "2""#,
        ];
        for condition in ok {
            compile_condition(condition, &github()).unwrap_or_else(|err| panic!("{condition}: {err}"));
        }
        let refused = [
            r#"claims.aud == "tessera""#,
            r#"claims.repository == "octo/app""#,
            r#"claims.repository_owner == "octo" && claims.aud == "x""#,
            r#"claims.repository_id != "42""#,
            r#"claims.repository_id == claims.repository_owner_id"#,
            r#"claims.repository_id == "1" || claims.repository == "octo/app""#,
            r#"!(claims.repository_id == "1")"#,
            r#"true"#,
        ];
        for condition in refused {
            let err = compile_condition(condition, &github()).unwrap_err();
            assert!(err.contains("pins no immutable claim"), "{condition}: {err}");
        }
        let err = compile_condition(r#"claims.repository == "octo/app""#, &github()).unwrap_err();
        assert!(err.contains("it refers to: repository)"), "{err}");
        assert!(compile_condition("claims.repository_id ==", &github()).unwrap_err().contains("not valid CEL"));
        assert!(compile_condition(&"x".repeat(5000), &github()).unwrap_err().contains("limit is 4096"));
        let big = (0..300).map(|i| format!("claims.repository_id == \"{i}\"")).collect::<Vec<_>>().join(" && ");
        assert!(compile_condition(&big[..4000.min(big.len())], &github()).is_err());
    }

    #[test]
    fn kubernetes_paths_with_dotted_keys() {
        let immutable = preset_claims(IssuerPreset::Kubernetes).iter().map(|c| (*c).to_owned()).collect();
        let program = compile_condition(
            r#"claims["kubernetes.io"].serviceaccount.uid == "u-1" && claims["kubernetes.io"].namespace == "ci""#,
            &immutable,
        )
        .unwrap();
        let policy = Policy {
            name: "k".into(),
            issuer: "i".into(),
            template: SpiffeIdTemplate::parse(
                "spiffe://example.org/k8s/{kubernetes.io.namespace}/{kubernetes.io.pod.uid}",
                &TrustDomain::new("example.org").unwrap(),
            )
            .unwrap(),
            condition: program,
            x509_svid_ttl: Duration::from_secs(60),
            jwt_svid_ttl: Duration::from_secs(60),
        };
        let token = claims(
            json!({"kubernetes.io": {"namespace": "ci", "serviceaccount": {"uid": "u-1"}, "pod": {"uid": "p-9"}}}),
        );
        assert!(policy.matches(&token));
        assert_eq!(policy.spiffe_id(&token).unwrap().as_str(), "spiffe://example.org/k8s/ci/p-9");
        let other = claims(json!({"kubernetes.io": {"namespace": "ci", "serviceaccount": {"uid": "u-2"}}}));
        assert!(!policy.matches(&other));
        // A claim of the wrong type makes the condition an error, which is "no".
        assert!(!policy.matches(&claims(json!({"kubernetes.io": 5}))));
    }

    #[test]
    fn templates() {
        let td = TrustDomain::new("example.org").unwrap();
        let template =
            SpiffeIdTemplate::parse("spiffe://example.org/gh/{repository_owner_id}/{repository_id}", &td).unwrap();
        let token = claims(json!({"repository_owner_id": "7", "repository_id": 42, "ref": "refs/heads/main"}));
        assert_eq!(template.render(&token).unwrap().as_str(), "spiffe://example.org/gh/7/42");
        for bad in [
            json!({"repository_owner_id": "a/b", "repository_id": 1}),
            json!({"repository_owner_id": "..", "repository_id": 1}),
            json!({"repository_owner_id": "", "repository_id": 1}),
            json!({"repository_owner_id": true, "repository_id": 1}),
            json!({"repository_owner_id": 1.5, "repository_id": 1}),
            json!({"repository_owner_id": ["1"], "repository_id": 1}),
            json!({"repository_id": 1}),
        ] {
            assert!(template.render(&claims(bad.clone())).is_err(), "{bad}");
        }
        for bad in [
            "spiffe://other.org/{sub}",
            "spiffe://{sub}.example.org/x",
            "spiffe://example.org/{sub",
            "spiffe://example.org/}",
            "spiffe://example.org/{a b}",
            "https://example.org/{sub}",
            "spiffe://example.org//{sub}",
        ] {
            assert!(SpiffeIdTemplate::parse(bad, &td).is_err(), "{bad}");
        }
    }

    fn exchange_config(spiffe_id: &str) -> Result<ServerConfig, crate::config::ConfigError> {
        let text = format!(
            r#"trust_domain = "example.org"
[[token_exchange.issuer]]
issuer = "https://issuer.example"
jwks = '{{"keys": [{{"kty": "EC", "crv": "P-256", "kid": "k", "x": "0gcbgdGUyKc7UjwpOKT-3AafpIoAmpdS7SIP7jyy7Yo", "y": "bTstaiQUnJtWW8bFibM1KpG6EYtuN39V3bnZY_R6uNc"}}]}}'
audience = "tessera"
[[token_exchange.policy]]
name = "p"
issuer = "https://issuer.example"
spiffe_id = "{spiffe_id}"
condition = 'claims.sub == "x"'
"#
        );
        crate::config::parse(&text, std::path::Path::new("server.toml"))
    }

    #[test]
    fn the_reserved_namespace_is_refused_at_load_and_when_claims_would_reach_it() {
        for reserved in ["spiffe://example.org/tessera/{sub}", "spiffe://example.org/tessera/server"] {
            let message = exchange_config(reserved).unwrap_err().to_string();
            assert!(message.contains("token_exchange.policy.spiffe_id"), "{reserved}: {message}");
            assert!(message.contains("reserved /tessera namespace"), "{reserved}: {message}");
        }
        for allowed in ["spiffe://example.org/tesseract/{sub}", "spiffe://example.org/ci/tessera/{sub}"] {
            exchange_config(allowed).unwrap_or_else(|err| panic!("{allowed}: {err}"));
        }
        let config = exchange_config("spiffe://example.org/{a}/{b}").unwrap();
        let Compiled { policies, .. } = compile(&config).unwrap();
        let policy = &policies[0];
        assert_eq!(
            policy.spiffe_id(&claims(json!({"a": "ci", "b": "server"}))).unwrap().as_str(),
            "spiffe://example.org/ci/server"
        );
        for (a, b) in [("tessera", "server"), ("tessera", "agent")] {
            let err = policy.spiffe_id(&claims(json!({"a": a, "b": b}))).unwrap_err();
            assert!(err.contains("reserved"), "{a}/{b}: {err}");
        }
    }

    #[test]
    fn claim_lookup_prefers_exact_keys() {
        let token = claims(json!({"a.b": 1, "a": {"b": 2, "c": {"d": 3}}}));
        assert_eq!(lookup_claim(&token, "a.b"), Some(&json!(1)));
        assert_eq!(lookup_claim(&token, "a.c.d"), Some(&json!(3)));
        assert_eq!(lookup_claim(&token, "a.x"), None);
    }
}
