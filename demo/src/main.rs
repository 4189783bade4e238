fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(served) = demo::cluster::serve_main(&args) {
        return served;
    }
    Ok(())
}
