use std::str::FromStr;

use tracing_subscriber::EnvFilter;

/// How logs are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Human,
    /// One JSON object per line.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "human" | "text" | "pretty" => Ok(LogFormat::Human),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("unknown log format {other:?} (human or json)")),
        }
    }
}

/// Installs the global subscriber; `RUST_LOG` overrides the default `info`.
/// Safe to call twice (the second call does nothing).
///
/// When `OTEL_EXPORTER_OTLP_ENDPOINT` is set, spans are also exported to that
/// OpenTelemetry collector (OTLP, HTTP/protobuf, batched), under
/// `OTEL_SERVICE_NAME` or the service's name. Unset: nothing is exported.
pub fn init_tracing(format: LogFormat) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;

    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,hyper=warn"));
    // Colours only on a terminal: redirected to a file, logs stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let fmt = match format {
        LogFormat::Human => fmt.boxed(),
        LogFormat::Json => fmt.json().boxed(),
    };
    let (otel, export_error) = match otlp::tracer() {
        Ok(tracer) => (
            tracer.map(|t| tracing_opentelemetry::layer().with_tracer(t)),
            None,
        ),
        Err(e) => (None, Some(e)),
    };
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init()
        .is_ok();
    if installed {
        if let Some(e) = export_error {
            tracing::warn!(error = %e, "OTLP export not set up; logging only");
        }
    }
}

/// Exports the spans still buffered (OTLP export only; a no-op otherwise).
/// Call it before the process exits.
pub fn flush_traces() {
    otlp::flush();
}

mod otlp {
    use std::sync::OnceLock;

    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
    use opentelemetry_sdk::Resource;

    static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

    /// The name spans are exported under when `OTEL_SERVICE_NAME` is unset:
    /// `order-service` or `shipping-service` (also under the `svc` runner,
    /// which takes it as its first argument), else the executable's name.
    fn service_name() -> String {
        let args: Vec<String> = std::env::args().take(2).collect();
        let stem = |s: &String| {
            std::path::Path::new(s)
                .file_stem()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        args.iter()
            .map(stem)
            .find(|n| n.ends_with("-service"))
            .or_else(|| args.first().map(stem))
            .unwrap_or_else(|| "unknown_service".into())
    }

    /// A tracer exporting over OTLP/HTTP when `OTEL_EXPORTER_OTLP_ENDPOINT`
    /// is set (the exporter reads it and the other `OTEL_EXPORTER_OTLP_*`
    /// variables itself); `None` when it is not.
    pub(super) fn tracer() -> Result<Option<SdkTracer>, String> {
        let set = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")
            .map(|v| !v.trim().is_empty())
            .unwrap_or(false);
        if !set {
            return Ok(None);
        }
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
            .map_err(|e| e.to_string())?;
        let mut resource = Resource::builder();
        if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
            resource = resource.with_service_name(service_name());
        }
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.build())
            .build();
        let tracer = provider.tracer("service-kit");
        opentelemetry::global::set_tracer_provider(provider.clone());
        let _ = PROVIDER.set(provider);
        Ok(Some(tracer))
    }

    pub(super) fn flush() {
        if let Some(p) = PROVIDER.get() {
            let _ = p.force_flush();
        }
    }
}
