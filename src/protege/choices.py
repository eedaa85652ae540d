"""The allowed values of settings checked in more than one place, defined once and free of heavy imports (the
command line lists them in --help without loading torch)."""

REVERSE_KL_TOP_1_MODES = ("sampled", "argmax")  # DistillationConfig.reverse_kl_top_1_mode
TEACHER_PROTOCOLS = ("protege", "openai")  # DistillationConfig.teacher_server_protocol
RESPONSE_FORMATS = ("json", "binary", "compact")  # teacher server payloads (teacher_server_response_format)
VLLM_MODES = ("colocate", "server")  # DistillationConfig.vllm_mode
DTYPE_NAMES = ("float32", "bfloat16", "float16", "auto")  # weights dtypes by name (init kwargs, serve-teacher)
