//! `esq token …`: makes bearer tokens and the token-file lines that grant them a role (see
//! `esq_runtime::auth`). The token itself is printed once, to stdout; the file only ever holds
//! its SHA-256.

use esq_runtime::auth::{hash_token, new_token, token_line, Role};
use std::io::Read as _;

/// `esq token …`.
#[derive(clap::Args, Debug)]
pub struct TokenArgs {
    #[command(subcommand)]
    command: TokenCommand,
}

#[derive(clap::Subcommand, Debug)]
enum TokenCommand {
    /// Makes a random token: prints it on stdout, and on stderr the line to add to the
    /// server's --auth-tokens file.
    New {
        /// What the token may do: reader, writer or admin.
        #[arg(long)]
        role: Role,
        /// Who holds it (one word, shown in logs and refusals).
        #[arg(long)]
        name: String,
    },
    /// Reads a token on stdin and prints its SHA-256 (hex), or the whole token-file line with
    /// --role and --name.
    Hash {
        /// The role of the line to print.
        #[arg(long, requires = "name")]
        role: Option<Role>,
        /// The name of the line to print.
        #[arg(long, requires = "role")]
        name: Option<String>,
    },
}

/// Runs `esq token …`.
pub fn run(args: TokenArgs) -> anyhow::Result<()> {
    match args.command {
        TokenCommand::New { role, name } => {
            check_name(&name)?;
            let token = new_token()?;
            println!("{token}");
            eprintln!("{}", token_line(role, &token, &name));
        }
        TokenCommand::Hash { role, name } => {
            let mut input = String::new();
            std::io::stdin().read_to_string(&mut input)?;
            let token = input.trim();
            anyhow::ensure!(!token.is_empty(), "no token on stdin");
            match (role, name) {
                (Some(role), Some(name)) => {
                    check_name(&name)?;
                    println!("{}", token_line(role, token, &name));
                }
                _ => println!("{}", hash_token(token)),
            }
        }
    }
    Ok(())
}

fn check_name(name: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        !name.is_empty() && !name.contains(char::is_whitespace) && !name.contains('#'),
        "--name {name:?}: one word, without spaces or #"
    );
    Ok(())
}
