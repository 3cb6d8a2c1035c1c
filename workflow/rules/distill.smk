# Student side: every method of the comparison is one folder students/{method}/.


rule student_sft_baseline:
    # The "student SFT only" baseline is the student SFT model itself.
    input:
        lambda w: sft_model("student"),
    output:
        directory(f"{R}/students/sft"),
    log:
        f"{R}/logs/students/sft.log",
    benchmark:
        f"{R}/benchmarks/students/sft.tsv"
    conda:
        ENV
    threads: stage_threads("data")
    resources:
        **stage_resources("data"),
    shell:
        "cp -r {input} {output} > {log} 2>&1"


rule distill:
    # One run of a method with one seed: students/<method> (the experiment's seed) or students/<method>-seed<N>.
    input:
        init=lambda w: sft_model("student"),
        tokens=token_shards("train"),
        signals=lambda w: method_shards(STUDENT_RUNS[w.run][0], "train"),
        eval_tokens=token_shards("test"),
        eval_signals=signal_shards("dpo-ref-student", "test"),
        extra=lambda w: method_extra_inputs(STUDENT_RUNS[w.run][0]),
        selected=lambda w: run_selected(w.run),
    output:
        directory(f"{R}/students/{{run}}"),
    log:
        f"{R}/logs/students/{{run}}.log",
    benchmark:
        f"{R}/benchmarks/students/{{run}}.tsv"
    wildcard_constraints:
        run="|".join(re.escape(r) for r in TRAINED_RUNS) or "none",
    conda:
        ENV
    threads: stage_threads("student")
    resources:
        **stage_resources("student"),
    params:
        launch=launch_prefix("student"),
        # a plain function of the wildcards: Snakemake records it, so a changed setting reruns the job
        flags=lambda w: distill_flags(*STUDENT_RUNS[w.run]),
    shell:
        "{params.launch} train --init {input.init} --out {output} --tokens {input.tokens}"
        " --eval-tokens {input.eval_tokens} --eval-signals {input.eval_signals} {params.flags} > {log} 2>&1"


localrules:
    select_lr,


rule distill_search:
    # A method's run at one rate of distill.lr_grid (seed `seed`), held out on the VALID split.
    input:
        init=lambda w: sft_model("student"),
        tokens=token_shards("train"),
        signals=lambda w: method_shards(w.method, "train"),
        eval_tokens=token_shards("valid"),
        eval_signals=signal_shards("dpo-ref-student", "valid"),
        extra=lambda w: method_extra_inputs(w.method),
    output:
        directory(f"{R}/students-grid/{{method}}/lr-{{rate}}"),
    log:
        f"{R}/logs/students-grid/{{method}}-lr-{{rate}}.log",
    benchmark:
        f"{R}/benchmarks/students-grid/{{method}}-lr-{{rate}}.tsv"
    wildcard_constraints:
        method="|".join(re.escape(m) for m in SEARCHED) or "none",
        rate="|".join(re.escape(t) for t in GRID) or "none",
    conda:
        ENV
    threads: stage_threads("student")
    resources:
        **stage_resources("student"),
    params:
        launch=launch_prefix("student"),
        flags=lambda w: distill_flags(w.method, lr=GRID[w.rate]),
    shell:
        "{params.launch} train --init {input.init} --out {output} --tokens {input.tokens}"
        " --eval-tokens {input.eval_tokens} --eval-signals {input.eval_signals} {params.flags} > {log} 2>&1"


rule select_lr:
    # The rate with the best valid accuracy; its run becomes students/<method> (hard links, no retraining).
    input:
        lambda w: [grid_dir(w.method, tag) for tag in GRID],
    output:
        selected=f"{R}/students-grid/{{method}}/selected.json",
        model=directory(f"{R}/students/{{method}}"),
    log:
        f"{R}/logs/students-grid/{{method}}-select.log",
    benchmark:
        f"{R}/benchmarks/students-grid/{{method}}-select.tsv"
    wildcard_constraints:
        method="|".join(re.escape(m) for m in SEARCHED) or "none",
    conda:
        ENV
    threads: stage_threads("data")
    resources:
        **stage_resources("data"),
    params:
        runs=lambda w: " ".join(f"{GRID[tag]!r}={grid_dir(w.method, tag)}" for tag in GRID),
    shell:
        "prefkd select-lr --run {params.runs} --out {output.selected} --model-out {output.model} > {log} 2>&1"
