//! The echo-forkd binary: everything lives in the library.

fn main() {
    std::process::exit(echo_forkd::run());
}
