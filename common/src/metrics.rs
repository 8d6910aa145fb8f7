//! Prometheus metrics plumbing shared by the server and the agent: `GET /metrics` over HTTP,
//! a lock-free latency histogram, and a tower layer that counts gRPC calls by method and
//! status code.
//!
//! # Hot-path cost
//!
//! Instrumented code only touches atomics. [`Histogram::observe`] is a bucket search over a
//! dozen bounds and three relaxed atomic adds. [`GrpcMetricsLayer`] resolves the method from a
//! fixed table and keeps one counter per (method, status code) in a `OnceLock`: the registry's
//! lock is taken only the first time a combination is seen, so a series appears once it is
//! used and every later call is lock- and allocation-free.
//!
//! # Exposition
//!
//! [`serve`] answers `GET /metrics` with the OpenMetrics text encoding of a
//! [`Registry`] (which Prometheus scrapes as `application/openmetrics-text`). Values that are
//! only worth computing when someone looks (counts held in a datastore, time to the next CA
//! rotation) come from a [`Refresh`] hook run before each encoding, or from a
//! [`prometheus_client::collector::Collector`] the caller registers.

use std::fmt::{self, Write as _};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{self, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// The content type of the OpenMetrics text encoding.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Bucket bounds (seconds) for calls answered from memory or after one signing operation:
/// 100 µs to 10 s.
pub const LATENCY_BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

/// An async hook run before each scrape (to refresh gauges whose value costs I/O).
pub type Refresh = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// A histogram of durations whose observation is lock-free (relaxed atomics only).
///
/// Cloning shares the counts, so a clone registered with a [`Registry`] shows what the
/// original observes.
#[derive(Clone)]
pub struct Histogram {
    inner: Arc<HistogramInner>,
}

struct HistogramInner {
    /// Upper bounds, ascending; a last, implicit bucket is `+Inf`.
    bounds: &'static [f64],
    /// Non-cumulative counts, one per bound plus `+Inf`.
    counts: Box<[AtomicU64]>,
    /// Sum of the observations, in nanoseconds.
    sum_nanos: AtomicU64,
}

impl fmt::Debug for Histogram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Histogram").field("bounds", &self.inner.bounds).field("count", &self.count()).finish()
    }
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new(LATENCY_BUCKETS)
    }
}

impl Histogram {
    /// A histogram with these ascending upper bounds, in seconds.
    pub fn new(bounds: &'static [f64]) -> Self {
        let counts = (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect();
        Self { inner: Arc::new(HistogramInner { bounds, counts, sum_nanos: AtomicU64::new(0) }) }
    }

    /// Records one duration.
    pub fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let index = self.inner.bounds.iter().position(|bound| seconds <= *bound).unwrap_or(self.inner.bounds.len());
        if let Some(count) = self.inner.counts.get(index) {
            count.fetch_add(1, Ordering::Relaxed);
        }
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.inner.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// Records the time since `start`.
    pub fn observe_since(&self, start: Instant) {
        self.observe(start.elapsed());
    }

    /// How many durations were recorded.
    pub fn count(&self) -> u64 {
        self.inner.counts.iter().map(|count| count.load(Ordering::Relaxed)).sum()
    }
}

impl TypedMetric for Histogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Histogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), fmt::Error> {
        // The encoder accumulates the per-bucket counts itself, and spells `f64::MAX` "+Inf".
        let mut count = 0u64;
        let mut buckets = Vec::with_capacity(self.inner.counts.len());
        for (index, bucket) in self.inner.counts.iter().enumerate() {
            let value = bucket.load(Ordering::Relaxed);
            count = count.saturating_add(value);
            buckets.push((self.inner.bounds.get(index).copied().unwrap_or(f64::MAX), value));
        }
        let sum = Duration::from_nanos(self.inner.sum_nanos.load(Ordering::Relaxed)).as_secs_f64();
        encoder.encode_histogram::<prometheus_client::encoding::NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// The OpenMetrics text of everything in `registry` (ending with `# EOF`).
pub fn encode_text(registry: &Registry) -> Result<String, fmt::Error> {
    let mut text = String::with_capacity(8 * 1024);
    prometheus_client::encoding::text::encode(&mut text, registry)?;
    Ok(text)
}

// ---- gRPC calls ---------------------------------------------------------------------------------

/// gRPC status code names (index = numeric code), as `code` label values.
pub const GRPC_CODES: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];

/// Label value for a path outside the known method table.
const OTHER_METHOD: &str = "other";

type CallLabels = [(&'static str, &'static str); 2];
type MethodLabels = [(&'static str, &'static str); 1];

/// Per-method, per-status-code counts and per-method latency of one gRPC server.
///
/// Calls are counted when their response headers are ready: a unary call with its result, a
/// server stream when it opens (a stream refused before its first message counts with its
/// error code). The latency is the time to that point.
pub struct GrpcCallMetrics {
    /// Full paths (`/package.Service/Method`) and the label value of each.
    methods: &'static [(&'static str, &'static str)],
    calls: Family<CallLabels, Counter>,
    latency: Family<MethodLabels, Histogram, fn() -> Histogram>,
    /// `(methods.len() + 1) * 17` lazily created counters (the last method row is "other").
    call_slots: Box<[OnceLock<Counter>]>,
    latency_slots: Box<[OnceLock<Histogram>]>,
    /// Extra per-code hook (e.g. refusal counters), called with the code index.
    on_code: Option<fn(&GrpcCallMetrics, &'static str, usize)>,
    refusals: Family<[(&'static str, &'static str); 1], Counter>,
}

impl fmt::Debug for GrpcCallMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcCallMetrics").field("methods", &self.methods.len()).finish_non_exhaustive()
    }
}

fn default_histogram() -> Histogram {
    Histogram::default()
}

impl GrpcCallMetrics {
    /// Metrics for a server with these methods (`(path, label)`), registered in `registry` as
    /// `<calls_name>{method,code}` and `<latency_name>{method}` (seconds).
    pub fn register(
        registry: &mut Registry,
        calls_name: &str,
        latency_name: &str,
        methods: &'static [(&'static str, &'static str)],
    ) -> Arc<Self> {
        let calls = Family::<CallLabels, Counter>::default();
        let latency = Family::<MethodLabels, Histogram, fn() -> Histogram>::new_with_constructor(default_histogram);
        registry.register(calls_name, "gRPC calls answered, by method and status code", calls.clone());
        registry.register(
            latency_name,
            "Seconds from a gRPC call's arrival to its response headers (a stream's opening), by method",
            latency.clone(),
        );
        let rows = methods.len() + 1;
        Arc::new(Self {
            methods,
            calls,
            latency,
            call_slots: (0..rows * GRPC_CODES.len()).map(|_| OnceLock::new()).collect(),
            latency_slots: (0..rows).map(|_| OnceLock::new()).collect(),
            on_code: None,
            refusals: Family::default(),
        })
    }

    /// Also counts refusals for overload in `<name>{reason}`: `ResourceExhausted` answers as
    /// `reason="rate_limited"`, `Unavailable` ones as `reason="unavailable"`.
    pub fn register_with_refusals(
        registry: &mut Registry,
        calls_name: &str,
        latency_name: &str,
        refusals_name: &str,
        methods: &'static [(&'static str, &'static str)],
    ) -> Arc<Self> {
        let mut metrics = Self::register(registry, calls_name, latency_name, methods);
        let refusals = Family::<[(&'static str, &'static str); 1], Counter>::default();
        registry.register(
            refusals_name,
            "Calls refused for load: rate_limited (ResourceExhausted) or unavailable (Unavailable)",
            refusals.clone(),
        );
        if let Some(inner) = Arc::get_mut(&mut metrics) {
            inner.refusals = refusals;
            inner.on_code = Some(count_refusal);
        }
        metrics
    }

    /// The row of a request path in the method table (the last row is "other").
    fn method_index(&self, path: &str) -> usize {
        self.methods.iter().position(|(known, _)| *known == path).unwrap_or(self.methods.len())
    }

    fn method_label(&self, index: usize) -> &'static str {
        self.methods.get(index).map_or(OTHER_METHOD, |(_, label)| label)
    }

    /// Records one answered call.
    pub fn record(&self, method_index: usize, code: usize, elapsed: Duration) {
        let code = code.min(GRPC_CODES.len() - 1);
        let method = self.method_label(method_index);
        let slot = method_index.saturating_mul(GRPC_CODES.len()).saturating_add(code);
        if let Some(cell) = self.call_slots.get(slot) {
            cell.get_or_init(|| self.calls.get_or_create_owned(&[("method", method), ("code", GRPC_CODES[code])]))
                .inc();
        }
        if let Some(cell) = self.latency_slots.get(method_index) {
            cell.get_or_init(|| self.latency.get_or_create_owned(&[("method", method)])).observe(elapsed);
        }
        if let Some(hook) = self.on_code {
            hook(self, method, code);
        }
    }

    /// How many calls of `method` (its label) ended with `code` (its name); for tests.
    pub fn calls(&self, method: &str, code: &str) -> u64 {
        let (Some(m), Some(c)) = (
            self.methods
                .iter()
                .position(|(_, label)| *label == method)
                .or((method == OTHER_METHOD).then_some(self.methods.len())),
            GRPC_CODES.iter().position(|name| *name == code),
        ) else {
            return 0;
        };
        self.call_slots.get(m * GRPC_CODES.len() + c).and_then(OnceLock::get).map_or(0, Counter::get)
    }
}

fn count_refusal(metrics: &GrpcCallMetrics, _method: &'static str, code: usize) {
    let reason = match GRPC_CODES.get(code) {
        Some(&"ResourceExhausted") => "rate_limited",
        Some(&"Unavailable") => "unavailable",
        _ => return,
    };
    metrics.refusals.get_or_create(&[("reason", reason)]).inc();
}

/// The status code of a gRPC response from its headers: `grpc-status` when the call ended
/// with the headers (an error), else OK (the result follows in the body and trailers).
fn response_code<B>(response: &http::Response<B>) -> usize {
    response
        .headers()
        .get("grpc-status")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<usize>().ok())
        .unwrap_or(0)
}

/// A tower layer that records every call of a gRPC server in [`GrpcCallMetrics`].
#[derive(Debug, Clone)]
pub struct GrpcMetricsLayer {
    metrics: Arc<GrpcCallMetrics>,
}

impl GrpcMetricsLayer {
    /// The layer recording into `metrics`.
    pub fn new(metrics: Arc<GrpcCallMetrics>) -> Self {
        Self { metrics }
    }
}

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetricsService { inner, metrics: Arc::clone(&self.metrics) }
    }
}

/// The service of [`GrpcMetricsLayer`].
#[derive(Debug, Clone)]
pub struct GrpcMetricsService<S> {
    inner: S,
    metrics: Arc<GrpcCallMetrics>,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for GrpcMetricsService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = GrpcMetricsFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let method = self.metrics.method_index(request.uri().path());
        GrpcMetricsFuture {
            inner: self.inner.call(request),
            metrics: Arc::clone(&self.metrics),
            method,
            start: Instant::now(),
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`GrpcMetricsService`].
    pub struct GrpcMetricsFuture<F> {
        #[pin]
        inner: F,
        metrics: Arc<GrpcCallMetrics>,
        method: usize,
        start: Instant,
    }
}

impl<F, B, E> Future for GrpcMetricsFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let output = match this.inner.poll(cx) {
            Poll::Ready(output) => output,
            Poll::Pending => return Poll::Pending,
        };
        // A transport-level failure has no gRPC status; it counts as Internal.
        let code = output.as_ref().map_or(13, response_code);
        this.metrics.record(*this.method, code, this.start.elapsed());
        Poll::Ready(output)
    }
}

// ---- HTTP endpoint -------------------------------------------------------------------------------

#[derive(Clone)]
struct Endpoint {
    registry: Arc<Registry>,
    refresh: Option<Refresh>,
}

/// Serves `GET /metrics` from `registry` on `listener` until `shutdown` completes. `refresh`
/// runs before each encoding.
pub async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    refresh: Option<Refresh>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let router = Router::new().route("/metrics", get(scrape)).with_state(Endpoint { registry, refresh });
    axum::serve(listener, router).with_graceful_shutdown(shutdown).await
}

async fn scrape(State(endpoint): State<Endpoint>) -> Response {
    if let Some(refresh) = &endpoint.refresh {
        refresh().await;
    }
    match encode_text(&endpoint.registry) {
        Ok(text) => {
            let mut response = text.into_response();
            response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
            response
        }
        Err(_) => {
            let mut message = String::new();
            let _ = writeln!(message, "cannot encode the metrics");
            (StatusCode::INTERNAL_SERVER_ERROR, message).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_with_sum_and_count() {
        let mut registry = Registry::default();
        let histogram = Histogram::new(&[0.001, 0.01]);
        registry.register("probe_seconds", "a probe", histogram.clone());
        histogram.observe(Duration::from_micros(500));
        histogram.observe(Duration::from_millis(5));
        histogram.observe(Duration::from_secs(1));
        let text = encode_text(&registry).unwrap();
        assert!(text.contains("probe_seconds_bucket{le=\"0.001\"} 1\n"), "{text}");
        assert!(text.contains("probe_seconds_bucket{le=\"0.01\"} 2\n"), "{text}");
        assert!(text.contains("probe_seconds_bucket{le=\"+Inf\"} 3\n"), "{text}");
        assert!(text.contains("probe_seconds_count 3\n"), "{text}");
        assert!(text.contains("probe_seconds_sum 1.0055\n"), "{text}");
        assert_eq!(histogram.count(), 3);
    }

    #[test]
    fn grpc_calls_are_counted_by_method_and_code() {
        static METHODS: &[(&str, &str)] = &[("/pkg.Svc/Get", "Get"), ("/pkg.Svc/Put", "Put")];
        let mut registry = Registry::default();
        let metrics =
            GrpcCallMetrics::register_with_refusals(&mut registry, "calls", "call_seconds", "refused", METHODS);
        metrics.record(metrics.method_index("/pkg.Svc/Get"), 0, Duration::from_millis(1));
        metrics.record(metrics.method_index("/pkg.Svc/Get"), 0, Duration::from_millis(1));
        metrics.record(metrics.method_index("/pkg.Svc/Put"), 8, Duration::from_millis(1));
        metrics.record(metrics.method_index("/evil/path"), 12, Duration::from_millis(1));
        assert_eq!(metrics.calls("Get", "OK"), 2);
        assert_eq!(metrics.calls("Put", "ResourceExhausted"), 1);
        assert_eq!(metrics.calls("other", "Unimplemented"), 1);
        let text = encode_text(&registry).unwrap();
        assert!(text.contains("calls_total{method=\"Get\",code=\"OK\"} 2"), "{text}");
        assert!(text.contains("refused_total{reason=\"rate_limited\"} 1"), "{text}");
        assert!(!text.contains("method=\"Put\",code=\"OK\""), "unused series are not created: {text}");
    }
}
