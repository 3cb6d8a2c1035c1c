# Student side: every method of the comparison is one folder students/{method}/.


rule student_sft_baseline:
    # The "student SFT only" baseline is the student SFT model itself.
    input:
        lambda w: sft_model("student"),
    output:
        directory(f"{R}/students/sft"),
    log:
        f"{R}/logs/students/sft.log",
    conda:
        ENV
    threads: stage_threads("data")
    resources:
        **stage_resources("data"),
    shell:
        "cp -r {input} {output} > {log} 2>&1"


rule distill:
    input:
        init=lambda w: sft_model("student"),
        tokens=token_shards("train"),
        signals=lambda w: method_shards(w.method, "train"),
        eval_tokens=token_shards("test"),
        eval_signals=signal_shards("dpo-ref-student", "test"),
        extra=lambda w: method_extra_inputs(w.method),
    output:
        directory(f"{R}/students/{{method}}"),
    log:
        f"{R}/logs/students/{{method}}.log",
    wildcard_constraints:
        method="|".join(re.escape(m) for m in STUDENT_METHODS if m != "sft") or "none",
    conda:
        ENV
    threads: stage_threads("student")
    resources:
        **stage_resources("student"),
    params:
        launch=launch_prefix("student"),
        # a plain function of the wildcards: Snakemake records it, so a changed setting reruns the job
        flags=lambda w: distill_flags(w.method),
    shell:
        "{params.launch} train --init {input.init} --out {output} --tokens {input.tokens}"
        " --eval-tokens {input.eval_tokens} --eval-signals {input.eval_signals} {params.flags} > {log} 2>&1"
