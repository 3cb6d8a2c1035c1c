# Tokenizers, the demo's generated data, and the prepare stage.


rule tokenizer:
    output:
        directory(f"{R}/tokenizers/{{role}}"),
    params:
        source=lambda w: tokenizer_source(w.role),
        chat_template=lambda w: (
            f"--chat-template {config[w.role]['chat_template']}"
            if config[w.role]["chat_template"]
            else ""
        ),
        trust=lambda w: "--trust-remote-code" if config[w.role]["trust_remote_code"] else "",
        # a changed builtin chat template must rebuild the tokenizer (params changes rerun a rule)
        template_digest=lambda w: template_digest(w.role),
    wildcard_constraints:
        role="teacher|student",
    log:
        f"{R}/logs/tokenizer-{{role}}.log",
    resources:
        mem_mb=4000,
        runtime=20,
    conda:
        ENV
    shell:
        "prefkd tokenizer --source {params.source} --out {output} {params.chat_template} {params.trust} > {log} 2>&1"


rule demo_data:
    output:
        f"{R}/raw/demo_pairs.jsonl",
    params:
        pairs=config["data"]["demo_pairs"],
        seed=config["seed"],
    log:
        f"{R}/logs/demo_data.log",
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        ENV
    shell:
        "prefkd demo-data --out {output} --pairs {params.pairs} --seed {params.seed} > {log} 2>&1"


rule prepare:
    input:
        source=data_source(),
        tokenizers=expand(f"{R}/tokenizers/{{role}}", role=ROLES),
    output:
        expand(f"{R}/data/{{split}}.parquet", split=SPLITS),
        report=f"{R}/data/filter_report.json",
    params:
        source=source_argument,
        out_dir=lambda w, output: Path(output.report).parent,
        fmt=config["data"]["format"],
        valid=config["data"]["valid_fraction"],
        test=config["data"]["test_fraction"],
        seed=config["seed"],
        hf_split=config["data"]["hf_split"],
        hf_config=(
            f"--hf-config {config['data']['hf_config']}" if config["data"]["hf_config"] else ""
        ),
        max_pairs=(
            f"--max-pairs {config['data']['max_pairs']}" if config["data"]["max_pairs"] else ""
        ),
    log:
        f"{R}/logs/prepare.log",
    resources:
        mem_mb=8000,
        runtime=60,
    conda:
        ENV
    shell:
        "prefkd prepare --source {params.source} --out-dir {params.out_dir} --format {params.fmt}"
        " --tokenizer {input.tokenizers[0]} --tokenizer {input.tokenizers[1]}"
        " --valid-fraction {params.valid} --test-fraction {params.test} --seed {params.seed}"
        " --hf-split {params.hf_split} {params.hf_config} {params.max_pairs} > {log} 2>&1"
