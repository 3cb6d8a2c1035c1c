# Teacher side: initial models, SFT, contrastive teachers (pi+, pi-), signal shards.
# Every training job runs `accelerate launch` with a config from configs/accelerate/.


rule model_init:
    input:
        tokenizer=f"{R}/tokenizers/{{role}}",
    output:
        directory(f"{R}/models/{{role}}-init"),
    log:
        f"{R}/logs/model-init-{{role}}.log",
    benchmark:
        f"{R}/benchmarks/model-init-{{role}}.tsv"
    wildcard_constraints:
        role="teacher|student",
    conda:
        ENV
    threads: stage_threads("data")
    resources:
        **stage_resources("data"),
    params:
        flags=lambda w: stage_flags(ModelSettings, {"role": w.role}, source=config[w.role]["model"]),
    shell:
        "prefkd model --tokenizer {input.tokenizer} --out {output} {params.flags} > {log} 2>&1"


rule sft:
    # SFT of a role's initial model on the chosen responses (kind=sft) or, for the SFT construction of the
    # contrastive pair, on the rejected ones (kind=sft-rejected: the chosen side of the reversed pairs).
    input:
        init=f"{R}/models/{{role}}-init",
        tokens=lambda w: token_shards("train", reversed_=w.kind == "sft-rejected"),
    output:
        directory(f"{R}/models/{{role}}-{{kind}}"),
    log:
        f"{R}/logs/{{kind}}-{{role}}.log",
    benchmark:
        f"{R}/benchmarks/{{kind}}-{{role}}.tsv"
    wildcard_constraints:
        role="teacher|student",
        kind="sft|sft-rejected",
    conda:
        ENV
    threads: stage_threads(role_kind)
    resources:
        **stage_resources(role_kind),
    params:
        launch=launch_prefix(role_kind),
        flags=lambda w: sft_flags(w.role),
    shell:
        "{params.launch} train --init {input.init} --out {output} --tokens {input.tokens} {params.flags} > {log} 2>&1"


rule reverse:
    # The reversed dataset (chosen <-> rejected) of a split's token shards or DPO-reference signal shards is its
    # own artifact (tests prove it is swapped); one job per split, a few seconds of work.
    input:
        [f"{R}/{{prefix}}/{{split}}/shard-{item}.arrow" for item in ITEMS],
    output:
        [f"{R}/{{prefix}}-reversed/{{split}}/shard-{item}.arrow" for item in ITEMS],
    log:
        f"{R}/logs/reverse/{{prefix}}-{{split}}.log",
    benchmark:
        f"{R}/benchmarks/reverse/{{prefix}}-{{split}}.tsv"
    wildcard_constraints:
        prefix="tokens|signals/dpo-ref-(teacher|student)",
        split="train|valid|test",
    conda:
        ENV
    threads: stage_threads("data")
    resources:
        **stage_resources("data"),
    shell:
        "prefkd reverse --in {input} --out {output} > {log} 2>&1"


# Scoring jobs (DPO references and signal sets): `resources.signals.jobs` jobs per (set, split), each loading
# its models once and walking its share of the shards (a rerun after a crash redoes only unfinished shards).
for part in range(SIGNAL_JOBS):

    rule:
        # Reference log-probs of a role's SFT model on every response token (uniform weights):
        # what DPO needs, precomputed once so no training job holds a reference model.
        name:
            part_rule("dpo_reference", part)
        input:
            tokens=[f"{R}/tokens/{{split}}/shard-{item}.arrow" for item in part_items(part)],
            ref=lambda w: sft_model(w.role),
        output:
            [f"{R}/signals/dpo-ref-{{role}}/{{split}}/shard-{item}.arrow" for item in part_items(part)],
        log:
            f"{R}/logs/signals/dpo-ref-{{role}}-{{split}}{part_suffix(part)}.log",
        benchmark:
            f"{R}/benchmarks/signals/dpo-ref-{{role}}-{{split}}{part_suffix(part)}.tsv"
        wildcard_constraints:
            role="teacher|student",
            split="train|valid|test",
        conda:
            ENV
        threads: stage_threads("signals")
        resources:
            **stage_resources("signals"),
        params:
            flags=lambda w: dpo_reference_flags(w.role),
        shell:
            "OMP_NUM_THREADS={threads} prefkd signals --tokens {input.tokens} --out {output} --reference {input.ref}"
            " {params.flags} > {log} 2>&1"

    rule:
        # Span weights from the contrastive pair and the reference span log-probs.
        name:
            part_rule("signals", part)
        input:
            tokens=[f"{R}/tokens/{{split}}/shard-{item}.arrow" for item in part_items(part)],
            models=lambda w: signal_models(w.sigset),
        output:
            [f"{R}/signals/{{sigset}}/{{split}}/shard-{item}.arrow" for item in part_items(part)],
        log:
            f"{R}/logs/signals/{{sigset}}-{{split}}{part_suffix(part)}.log",
        benchmark:
            f"{R}/benchmarks/signals/{{sigset}}-{{split}}{part_suffix(part)}.tsv"
        wildcard_constraints:
            sigset="|".join(re.escape(n) for n in GENERIC_SETS) or "none",
            split="train|valid|test",
        conda:
            ENV
        threads: stage_threads("signals")
        resources:
            **stage_resources("signals"),
        params:
            # a plain function of the wildcards: Snakemake records it, so a changed setting reruns the job
            flags=lambda w: signal_flags(w.sigset),
        shell:
            "OMP_NUM_THREADS={threads} prefkd signals --tokens {input.tokens} --out {output} {params.flags} > {log} 2>&1"


rule dpo:
    # pi+ (direction=pos): DPO on (chosen > rejected); pi- (direction=neg): DPO on the reversed pairs.
    input:
        init=lambda w: sft_model(w.role),
        tokens=lambda w: token_shards("train", reversed_=w.direction == "neg"),
        signals=lambda w: dpo_ref_shards(w.role, "train", reversed_=w.direction == "neg"),
        eval_tokens=lambda w: token_shards("valid", reversed_=w.direction == "neg"),
        eval_signals=lambda w: dpo_ref_shards(w.role, "valid", reversed_=w.direction == "neg"),
    output:
        directory(f"{R}/models/{{role}}-dpo-{{direction}}"),
    log:
        f"{R}/logs/dpo-{{role}}-{{direction}}.log",
    benchmark:
        f"{R}/benchmarks/dpo-{{role}}-{{direction}}.tsv"
    wildcard_constraints:
        role="teacher|student",
        direction="pos|neg",
    conda:
        ENV
    threads: stage_threads(role_kind)
    resources:
        **stage_resources(role_kind),
    params:
        launch=launch_prefix(role_kind),
        flags=lambda w: dpo_flags(w.role, w.direction),
    shell:
        "{params.launch} train --init {input.init} --out {output} --tokens {input.tokens} --signals {input.signals}"
        " --eval-tokens {input.eval_tokens} --eval-signals {input.eval_signals} {params.flags} > {log} 2>&1"


rule weights_stats:
    # Weight histograms and the planted-difference check of every signal set, in one report.
    input:
        [p for sigset in SIGNAL_SETS for split in SPLITS for p in signal_shards(sigset, split)],
    output:
        f"{R}/stats/weights.json",
    log:
        f"{R}/logs/weights-stats.log",
    benchmark:
        f"{R}/benchmarks/weights-stats.tsv"
    conda:
        ENV
    threads: stage_threads("data")
    resources:
        **stage_resources("data"),
    params:
        shard_args=lambda w, input: " ".join(
            f"{sigset}={path}" for sigset in SIGNAL_SETS for split in SPLITS for path in signal_shards(sigset, split)
        ),
    shell:
        "prefkd weights-stats --out {output} --shards {params.shard_args} > {log} 2>&1"
