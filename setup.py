from setuptools import find_packages, setup

setup(
    name="capjax",
    version="0.1.0",
    description="Image-captioning training in JAX: Grain input, sharded jit training, "
                "Orbax checkpoints, COCO caption metrics.",
    python_requires=">=3.11",
    packages=find_packages(include=["pipeline*", "trainer*", "configs*"]),
    install_requires=[
        "jax>=0.10.2,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "grain>=0.2.18,<0.3",
        "array-record>=0.8,<0.9",
        "tensorflow-datasets>=4.9.10,<5",
        "importlib-resources>=6,<8",  # TFDS needs it to build datasets (tfds build)
        "transformers>=5.0,<6",
        "tokenizers>=0.22,<1",
        "evaluate>=0.4.6,<0.5",
        "nltk>=3.9,<4",
        "rouge-score>=0.1.2,<0.2",
        "regex>=2024.4",  # the PTB tokenizer: Unicode classes, longest (POSIX) matches
        "Pillow>=11,<14",
        "simplejpeg>=1.8,<2",
        "opencv-python-headless>=4.10,<6",
        "clu>=0.0.12,<0.1",
        "tensorflow-cpu>=2.20,<3",
        "tensorboard>=2.20,<3",
        "ml-collections>=1.0,<2",
        "msgpack>=1.0,<2",
        "numpy>=2.0,<3",
        # run directories in gs:// and s3:// (etils.epath on fsspec)
        "etils[epath]>=1.7",
        "fsspec>=2026.1",
        "gcsfs>=2026.1",
        "s3fs>=2026.1",
    ],
    extras_require={
        # `capjax prepare --runner beam`: Dataflow, Flink, Spark, or Beam's local runner
        "beam": ["apache-beam>=2.77,<3"],
        "test": ["pytest>=8,<10", "pytest-xdist>=3.6,<4", "pytest-timeout>=2.3,<3",
                 "pycocoevalcap==1.2", "torch==2.13.0",
                 "kubernetes>=30,<40", "peft>=0.13,<1", "apache-beam>=2.77,<3",
                 "moto[server]>=5.2,<6", "gcp-storage-emulator>=2026.7"],
    },
    entry_points={"console_scripts": ["capjax=trainer.cli:main"]},
)
