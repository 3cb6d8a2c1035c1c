# Teacher side: initial models, SFT, contrastive teachers (pi+, pi-), signal shards.
# Every training job runs `accelerate launch` with a config from configs/accelerate/.


rule model_init:
    input:
        tokenizer=f"{R}/tokenizers/{{role}}",
    output:
        directory(f"{R}/models/{{role}}-init"),
    params:
        source=lambda w: config[w.role]["model"],
        seed=config["seed"],
        trust=lambda w: "--trust-remote-code" if config[w.role]["trust_remote_code"] else "",
    wildcard_constraints:
        role="teacher|student",
    log:
        f"{R}/logs/model-init-{{role}}.log",
    resources:
        mem_mb=16000,
        runtime=60,
    conda:
        ENV
    shell:
        "prefkd model --source {params.source} --tokenizer {input.tokenizer} --out {output}"
        " --seed {params.seed} {params.trust} > {log} 2>&1"


rule sft:
    input:
        init=f"{R}/models/{{role}}-init",
        tokens=token_shards("train"),
    output:
        directory(f"{R}/models/{{role}}-sft"),
    params:
        launch=launch_prefix,
        common=train_common,
        lr=lambda w: config["sft"][w.role]["lr"],
        epochs=lambda w: config["sft"][w.role]["epochs"],
    wildcard_constraints:
        role="teacher|student",
    threads: 2
    log:
        f"{R}/logs/sft-{{role}}.log",
    resources:
        mem_mb=16000,
        runtime=600,
    conda:
        ENV
    shell:
        "{params.launch} train --stage sft --role {wildcards.role} --init {input.init} --out {output}"
        " --tokens {input.tokens} --lr {params.lr} --epochs {params.epochs} {params.common} > {log} 2>&1"


rule sft_rejected:
    # The SFT-construction negative: SFT on the rejected responses (= chosen of the reversed pairs).
    input:
        init=f"{R}/models/{{role}}-init",
        tokens=token_shards("train", reversed_=True),
    output:
        directory(f"{R}/models/{{role}}-sft-rejected"),
    params:
        launch=launch_prefix,
        common=train_common,
        lr=lambda w: config["sft"][w.role]["lr"],
        epochs=lambda w: config["sft"][w.role]["epochs"],
    wildcard_constraints:
        role="teacher|student",
    threads: 2
    log:
        f"{R}/logs/sft-rejected-{{role}}.log",
    resources:
        mem_mb=16000,
        runtime=600,
    conda:
        ENV
    shell:
        "{params.launch} train --stage sft --role {wildcards.role} --init {input.init} --out {output}"
        " --tokens {input.tokens} --lr {params.lr} --epochs {params.epochs} {params.common} > {log} 2>&1"


rule reverse_tokens:
    # The reversed dataset is its own artifact (tests prove it is swapped).
    input:
        f"{R}/tokens/{{split}}/shard-{{scatteritem}}.arrow",
    output:
        f"{R}/tokens-reversed/{{split}}/shard-{{scatteritem}}.arrow",
    wildcard_constraints:
        split="train|valid|test",
    log:
        f"{R}/logs/reverse/tokens-{{split}}-{{scatteritem}}.log",
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        ENV
    shell:
        "prefkd reverse --in {input} --out {output} > {log} 2>&1"


rule dpo_reference:
    # Reference log-probs of a role's SFT model on every response token (uniform weights):
    # what DPO needs, precomputed once so no training job holds a reference model.
    input:
        tokens=f"{R}/tokens/{{split}}/shard-{{scatteritem}}.arrow",
        ref=lambda w: sft_model(w.role),
    output:
        f"{R}/signals/dpo-ref-{{role}}/{{split}}/shard-{{scatteritem}}.arrow",
    params:
        batch=config["signals"]["batch_size"],
    wildcard_constraints:
        role="teacher|student",
        split="train|valid|test",
    threads: 2
    log:
        f"{R}/logs/signals/dpo-ref-{{role}}-{{split}}-{{scatteritem}}.log",
    resources:
        mem_mb=8000,
        runtime=120,
    conda:
        ENV
    shell:
        "OMP_NUM_THREADS={threads} prefkd signals --tokens {input.tokens} --out {output} --role {wildcards.role}"
        " --unit token --reference {input.ref} --transform uniform --batch-size {params.batch} > {log} 2>&1"


rule reverse_dpo_reference:
    input:
        f"{R}/signals/dpo-ref-{{role}}/{{split}}/shard-{{scatteritem}}.arrow",
    output:
        f"{R}/signals/dpo-ref-{{role}}-reversed/{{split}}/shard-{{scatteritem}}.arrow",
    wildcard_constraints:
        role="teacher|student",
        split="train|valid|test",
    log:
        f"{R}/logs/reverse/dpo-ref-{{role}}-{{split}}-{{scatteritem}}.log",
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        ENV
    shell:
        "prefkd reverse --in {input} --out {output} > {log} 2>&1"


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
    params:
        launch=launch_prefix,
        common=train_common,
        beta=lambda w: config["contrastive"][w.direction]["beta"],
        lr=lambda w: config["contrastive"][w.direction]["lr"],
        epochs=lambda w: config["contrastive"][w.direction]["epochs"],
    wildcard_constraints:
        role="teacher|student",
        direction="pos|neg",
    threads: 2
    log:
        f"{R}/logs/dpo-{{role}}-{{direction}}.log",
    resources:
        mem_mb=16000,
        runtime=600,
    conda:
        ENV
    shell:
        "{params.launch} train --stage preference --role {wildcards.role} --unit token"
        " --init {input.init} --out {output} --tokens {input.tokens} --signals {input.signals}"
        " --eval-tokens {input.eval_tokens} --eval-signals {input.eval_signals}"
        " --beta {params.beta} --lr {params.lr} --epochs {params.epochs} {params.common} > {log} 2>&1"


rule signals:
    # Span weights from the contrastive pair and the reference span log-probs, one job per shard.
    input:
        tokens=f"{R}/tokens/{{split}}/shard-{{scatteritem}}.arrow",
        models=lambda w: signal_models(w.sigset),
    output:
        f"{R}/signals/{{sigset}}/{{split}}/shard-{{scatteritem}}.arrow",
    params:
        # a plain function of the wildcards: Snakemake records it, so a changed setting reruns the job
        args=lambda w: signal_args(w.sigset),
    wildcard_constraints:
        sigset="|".join(re.escape(n) for n in GENERIC_SETS) or "none",
        split="train|valid|test",
    threads: 2
    log:
        f"{R}/logs/signals/{{sigset}}-{{split}}-{{scatteritem}}.log",
    resources:
        mem_mb=16000,
        runtime=120,
    conda:
        ENV
    shell:
        "OMP_NUM_THREADS={threads} prefkd signals --tokens {input.tokens} --out {output} {params.args} > {log} 2>&1"


rule weights_stats:
    # Weight histograms and the planted-difference check of every signal set, in one report.
    input:
        [p for sigset in SIGNAL_SETS for split in SPLITS for p in signal_shards(sigset, split)],
    output:
        f"{R}/stats/weights.json",
    params:
        shard_args=lambda w, input: " ".join(
            f"{sigset}={path}"
            for sigset in SIGNAL_SETS
            for split in SPLITS
            for path in signal_shards(sigset, split)
        ),
    log:
        f"{R}/logs/weights-stats.log",
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        ENV
    shell:
        "prefkd weights-stats --out {output} {params.shard_args} > {log} 2>&1"
