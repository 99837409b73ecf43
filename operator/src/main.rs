//! `sluice-operator`: reconciles StreamProcessors into scaled worker Deployments.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "sluice-operator", version, about = "The Sluice operator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the StreamProcessor CustomResourceDefinition as YAML.
    Crd,
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Crd => {
            print!("{}", sluice_crds::crd::crd_yaml());
            ExitCode::SUCCESS
        }
    }
}
