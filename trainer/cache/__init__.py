"""The teacher cache: a teacher's top-k scores of completions, on disk, to train from without a
teacher engine (`teacher.cache`) and to replay a parent model's distributions against forgetting
(`replay`). `store` reads and writes the shards and the manifest; `scoring` fills a cache through
the engines (`selfdistill score`, and a run's replay cache); `fidelity` measures what the top-k +
tail form loses."""
