use clap::Parser;
use shipping_service::{Application, Config};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    service_kit::init_tracing(config.log_format);
    let app = Application::build(config).await?;
    let outcome = app.run_until_stopped(service_kit::shutdown_signal()).await;
    service_kit::flush_traces();
    outcome
}
