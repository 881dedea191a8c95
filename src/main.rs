//! Entry point: parse arguments, set up logging, run, and map errors to exit codes
//! (0 clean shutdown, 1 failure at run time, 2 bad usage or material at startup).

use std::process::ExitCode;

use mtls_sidecar::app::App;
use mtls_sidecar::cli::{CheckArgs, Cli, Command, DemoArgs, DevPkiArgs, RunArgs, WaitArgs};
use mtls_sidecar::config::Config;
use mtls_sidecar::{demo, logwriter, pki, signal, telemetry};

/// Exit codes of the program, as the interface defines them.
#[derive(Debug, Clone, Copy)]
enum Exit {
    Ok = 0,
    Runtime = 1,
    Startup = 2,
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> Self {
        ExitCode::from(e as u8)
    }
}

fn fail(code: Exit, msg: impl std::fmt::Display) -> ExitCode {
    logwriter::flush();
    eprintln!("mtls-sidecar: error: {msg}");
    code.into()
}

/// Run a long-lived command on the runtime with SIGTERM/SIGINT wired to its shutdown token and
/// SIGHUP to its reload channel.
fn with_signals<F, Fut>(rt: &tokio::runtime::Runtime, body: F) -> ExitCode
where
    F: FnOnce(tokio_util::sync::CancellationToken, tokio::sync::watch::Receiver<u64>) -> Fut,
    Fut: std::future::Future<Output = ExitCode>,
{
    rt.block_on(async {
        match (signal::shutdown_on_signals(), signal::reload_on_sighup()) {
            (Ok(shutdown), Ok(hup)) => body(shutdown, hup).await,
            (Err(e), _) | (_, Err(e)) => fail(
                Exit::Runtime,
                format!("cannot install signal handlers: {e}"),
            ),
        }
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse_hiding_env();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(Exit::Runtime, format!("cannot start the runtime: {e}")),
    };
    match cli.command {
        Command::Run(args) => run(&rt, *args),
        Command::DevPki(args) => dev_pki(&args),
        Command::Check(args) => check(&rt, &args),
        Command::Wait(args) => wait(&rt, &args),
        Command::Demo(args) => demo(&rt, args),
    }
}

/// `run`: the proxy until SIGTERM/SIGINT.
fn run(rt: &tokio::runtime::Runtime, args: RunArgs) -> ExitCode {
    if let Err(e) = telemetry::init(&args.log) {
        return fail(Exit::Startup, e);
    }
    let config = match Config::from_run_args(&args) {
        Ok(c) => c,
        Err(e) => return fail(Exit::Startup, e),
    };
    let code = with_signals(rt, |shutdown, hup| async move {
        match App::bind(config).await {
            Ok(app) => {
                app.run(shutdown, hup).await;
                Exit::Ok.into()
            }
            Err(e) => fail(Exit::Startup, e),
        }
    });
    // The request lines still batched (see `logwriter`).
    logwriter::flush();
    code
}

/// `dev-pki`: write a throwaway PKI and say what each file is.
fn dev_pki(args: &DevPkiArgs) -> ExitCode {
    let written = pki::DevPki::generate()
        .map_err(|e| e.to_string())
        .and_then(|p| p.write(&args.out, args.force).map_err(|e| e.to_string()));
    if let Err(e) = written {
        return fail(Exit::Startup, e);
    }
    // A closed stdout (`dev-pki … | head -1`) must not panic: the files are
    // written, which is the command's job, so a failed report is ignored.
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "wrote a throwaway dev PKI to {}:", args.out.display());
    for f in pki::FILES {
        let _ = writeln!(out, "  {}", args.out.join(f).display());
    }
    let _ = writeln!(
        out,
        "server.pem is valid for localhost, 127.0.0.1 and ::1; client.pem is the \
         client identity; ca.pem signed both"
    );
    Exit::Ok.into()
}

/// `check`: exit code 1 when any route fails, so a script can gate on it.
fn check(rt: &tokio::runtime::Runtime, args: &CheckArgs) -> ExitCode {
    if let Err(e) = telemetry::init(&args.run.log) {
        return fail(Exit::Startup, e);
    }
    let config = match Config::from_run_args(&args.run) {
        Ok(c) => c,
        Err(e) => return fail(Exit::Startup, e),
    };
    let proxies = match config.open_proxies() {
        Ok(p) => p,
        Err(e) => return fail(Exit::Startup, e),
    };
    if rt.block_on(mtls_sidecar::check::run(&config, &proxies, args.format)) {
        Exit::Ok.into()
    } else {
        Exit::Runtime.into()
    }
}

/// `wait`: poll another instance's `/readyz` until it answers 200 or `--timeout` passes.
fn wait(rt: &tokio::runtime::Runtime, args: &WaitArgs) -> ExitCode {
    let timeout = match mtls_sidecar::config::parse_duration("--timeout", &args.timeout) {
        Ok(t) => t,
        Err(e) => return fail(Exit::Startup, e),
    };
    if rt.block_on(mtls_sidecar::wait::until_ready(&args.admin, timeout)) {
        Exit::Ok.into()
    } else {
        eprintln!(
            "mtls-sidecar: {} did not answer /readyz with 200 within {}",
            args.admin, args.timeout
        );
        Exit::Runtime.into()
    }
}

/// `demo`: a bad flag or a listener that cannot bind is a startup failure like `run`'s; the
/// rest print their whole chain of causes, as they happen at run time.
fn demo(rt: &tokio::runtime::Runtime, args: DemoArgs) -> ExitCode {
    if let Err(e) = telemetry::init(&args.log) {
        return fail(Exit::Startup, e);
    }
    with_signals(rt, |shutdown, hup| async move {
        match demo::run(args, shutdown, hup).await {
            Ok(()) => Exit::Ok.into(),
            Err(e @ (demo::Error::Config(_) | demo::Error::Startup(_))) => fail(Exit::Startup, e),
            Err(e) => fail(Exit::Runtime, with_causes(&e)),
        }
    })
}

/// `outer: cause: cause of that`, as `anyhow` prints `{:#}` (the demo's messages were written
/// for that form).
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(&format!(": {c}"));
        cause = c.source();
    }
    text
}
