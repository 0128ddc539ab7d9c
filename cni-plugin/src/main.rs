//! `twill`: the CNI plugin binary. All the work is in the library (`twill_cni`).

fn main() {
    std::process::exit(twill_cni::main());
}
