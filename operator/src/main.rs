use std::io::Write;

use clap::{Parser, Subcommand};

/// Kubernetes operator for tiproxy.
#[derive(Parser, Debug)]
#[command(name = "tiproxy-operator", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the TiProxy CustomResourceDefinition (YAML) to stdout.
    Crd,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => {
            let yaml = tiproxy_operator::crd_yaml()?;
            std::io::stdout().lock().write_all(yaml.as_bytes())?;
        }
    }
    Ok(())
}
