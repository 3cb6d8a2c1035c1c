# Tokenize + align, scattered over shards (each shard its own job), then gathered statistics.


rule tokenize_align:
    input:
        data=f"{R}/data/{{split}}.parquet",
        teacher=f"{R}/tokenizers/teacher",
        student=f"{R}/tokenizers/student",
    output:
        f"{R}/tokens/{{split}}/shard-{{scatteritem}}.arrow",
    log:
        f"{R}/logs/tokenize/{{split}}-{{scatteritem}}.log",
    benchmark:
        f"{R}/benchmarks/tokenize/{{split}}-{{scatteritem}}.tsv"
    wildcard_constraints:
        split="train|valid|test",
    conda:
        ENV
    threads: stage_threads("data")
    resources:
        **stage_resources("data"),
    params:
        flags=lambda w: stage_flags(TokenizeSettings, **config["tokenize"] | scatter_shard(w.scatteritem)),
    shell:
        "TOKENIZERS_PARALLELISM=false prefkd tokenize --data {input.data} --out {output}"
        " --teacher {input.teacher} --student {input.student} {params.flags} > {log} 2>&1"


rule alignment_stats:
    input:
        **{split: gather.shards(f"{R}/tokens/{split}/shard-{{scatteritem}}.arrow") for split in SPLITS},
    output:
        f"{R}/stats/alignment.json",
    log:
        f"{R}/logs/alignment_stats.log",
    benchmark:
        f"{R}/benchmarks/alignment_stats.tsv"
    conda:
        ENV
    threads: stage_threads("data")
    resources:
        **stage_resources("data"),
    params:
        shard_args=lambda w, input: " ".join(f"{split}={path}" for split in SPLITS for path in input[split]),
    shell:
        "prefkd alignment-stats --out {output} --shards {params.shard_args} > {log} 2>&1"
