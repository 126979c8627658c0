"""Per-stage throughput at paper resolution on toy-city data, printed as one table.

    python bench.py                 # every stage, CPU, the threads torch picks (set --threads)
    python bench.py --stages group copypaste --threads 1
    python bench.py --device cuda --gpu-check   # fp16 CUDA path at the paper's settings, peak memory (goal 16 GB)

Each stage's function returns rows (stage, what, value, unit). Numbers go into the README's bench table.
Not a test: timings are measured here, never asserted.
"""
import argparse
import os
import platform
import time

import torch


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def timed(fn, repeat=3, warmup=1):
    """Median wall seconds of fn() over `repeat` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


# ----- stage benches (each: def bench_<stage>(args) -> list of (stage, what, value, unit)) -----------------

# ===== depth =====
def bench_depth(args, size=(192, 640), batch=12, arch="resnet18", repeat=3):
    """Training s/step (frames 0 -1 1, 4 scales, Adam) fp32 and AMP, networks alone, and predict images/s.

    Random frames stand in for video: the step's cost does not depend on the pixel values. Monodepth2's own
    step at these settings on the 2-core reference machine: 12.3 s (networks alone 6.6 s).
    """
    import depth
    device = torch.device(args.device)
    H, W = size
    torch.manual_seed(0)
    depth_net, pose_net = depth.DepthNet(arch).to(device).train(), depth.PoseNet(arch).to(device).train()
    optimizer = torch.optim.Adam(list(depth_net.parameters()) + list(pose_net.parameters()), lr=1e-4)
    frames = torch.rand(batch, 3, 3, H, W)
    batch_dict = {"frames": frames, "aug": frames, "intrinsics": torch.tensor([[0.58, 1.92, 0.5, 0.5]] * batch)}
    train_args = depth.get_args_parser().parse_args(["train", "--data", ".", "--work", "."])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = []
    for amp in (None, depth.amp_dtype_for(device, False)):
        scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)

        def step():
            depth.train_step(depth_net, pose_net, optimizer, scaler, batch_dict, train_args, amp)
            sync()
        label = "fp32" if amp is None else f"autocast {str(amp).replace('torch.', '')}"
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        rows.append(("depth", f"train step {H}x{W} b{batch} {arch} ({label})", timed(step, repeat), "s/step"))
        if device.type == "cuda":
            rows.append(("depth", f"train peak memory ({label})", torch.cuda.max_memory_allocated() / 2 ** 30, "GiB"))

    def networks_only():
        x = frames.to(device)
        disps = depth_net(x[:, 0])
        aa, tr = pose_net(torch.cat([x[:, 1], x[:, 0]]), torch.cat([x[:, 0], x[:, 2]]))
        (sum(d.mean() for d in disps) + aa.mean() + tr.mean()).backward()
        sync()
    rows.append(("depth", f"networks fwd+bwd alone {H}x{W} b{batch} (fp32)", timed(networks_only, repeat), "s/step"))
    depth_net.eval()
    images = frames[:, 0].to(device)
    for amp in (None, depth.amp_dtype_for(device, False)):
        def forward():
            with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                depth_net(images)
            sync()
        label = "fp32" if amp is None else f"autocast {str(amp).replace('torch.', '')}"
        rows.append(("depth", f"predict {H}x{W} b{batch} ({label})", batch / timed(forward, repeat), "images/s"))
    return rows


# ===== group =====
def bench_group(args, repeat=7):
    """group.py for one 384 x 768 image with 10000 superpixels: reading the inputs (image, stereo disparity,
    camera JSON) to the saved .npy, single process (SLIC, InfoMap and numpy run on one core here; run with
    OMP_NUM_THREADS=1 to be sure). Median of `repeat` after a warm-up.

    This machine's speed drifts by up to 1.6x within minutes (a shared host), so the same loop also times the
    two library calls the stage cannot make cheaper, interleaved with it: skimage's SLIC alone and one InfoMap
    run alone on the first-level graph. "the stage's own work" (median of stage minus SLIC minus InfoMap, per
    run) is what group.py itself adds: I/O, back-projection, normals, graph, edge weights, the later merging
    levels.
    """
    import shutil
    import tempfile

    import group
    import toycity
    data = args.data
    if not os.path.exists(os.path.join(data, ".complete")):
        toycity.render_dataset(data, size=(384, 768), train_sequences=2, val_sequences=1, frames=3, seed=0)
    split = "val" if os.path.isdir(os.path.join(data, "leftImg8bit", "val")) else "train"
    work = tempfile.mkdtemp(prefix="bench_group_")
    rows = []
    try:
        for what, extra in [("", []), (", InfoMap preferred modules 10 (released)", ["--preferred-modules", "10"])]:
            a = group.get_args_parser().parse_args(["--work", work, "--data", data, "--split", split, "--stereo",
                                                    "--size", "384", "768", "--overwrite", *extra])
            os.makedirs(os.path.join(work, "regions"), exist_ok=True)
            item = group.list_items(a)[0]
            if extra:
                seconds = timed(lambda: group.process_one(item, a), repeat=3)
                rows.append(("group", f"one 384x768 image, 10000 superpixels, read -> .npy{what}", seconds, "s"))
                continue
            image, graph = bench_group_inputs(group, a, item)
            runs = []
            group.process_one(item, a)
            for _ in range(repeat):
                start = time.perf_counter()
                group.process_one(item, a)
                stage = time.perf_counter() - start
                start = time.perf_counter()
                group.slic_superpixels(image, a.segments)
                slic = time.perf_counter() - start
                start = time.perf_counter()
                group.infomap_modules(*graph, seed=a.seed, preferred_modules=a.preferred_modules)
                infomap = time.perf_counter() - start
                runs.append({"stage": stage, "slic alone": slic, "one InfoMap run alone": infomap,
                             "own": stage - slic - infomap})
            median = {k: sorted(r[k] for r in runs)[len(runs) // 2] for k in runs[0]}
            rows.append(("group", f"one 384x768 image, 10000 superpixels, read -> .npy (median of {repeat})",
                         median["stage"], "s"))
            rows.append(("group", "  fastest of those runs", min(r["stage"] for r in runs), "s"))
            rows.append(("group", "  reference: skimage SLIC alone (median)", median["slic alone"], "s"))
            rows.append(("group", "  reference: one InfoMap run alone, first-level graph (median)",
                         median["one InfoMap run alone"], "s"))
            rows.append(("group", "  the stage's own work: stage - SLIC - one InfoMap (median)", median["own"], "s"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def bench_group_inputs(group, a, item):
    """The working-size image and the first-level graph (nodes, edges, 1 / W) of one bench item (w_sup = 0,
    so the normals do not enter W)."""
    import numpy as np
    stem, path = item
    image, native = group.load_image(path, tuple(a.size))
    disparity = group.load_disparity(a, stem, native, tuple(a.size))[0]   # (stereo: its pitch < 1, Eqn 1 as is)
    labels = group.slic_superpixels(image, a.segments)
    n = int(labels.max()) + 1
    points = group.back_project(group.scale_free_depth(disparity), group.intrinsics_of(a, stem, native)[0])
    edges = group.region_adjacency(labels)
    centers = group.superpixel_means(labels, points, n)
    weights = group.edge_weights(edges, centers, np.zeros_like(centers), a.w_ocln, a.w_sup, a.bias)
    return image, (n, edges, 1.0 / weights)


# ===== copypaste =====
def bench_copypaste(args, size=(384, 768), mix=8, paste_times=(2, 4), repeat=3, worker_samples=8):
    """copypaste.py: one cross-context sample at paper settings (M 8, E 2 4, 384 x 768) on one thread, with and
    without the photometric augmentation, from the toy city's annotated frames (ground-truth disparity in
    pixels, instance ids as regions: about 50 per toy-city frame, more than the ~30 of a Cityscapes frame);
    then samples/s of the command with --workers 2 (one thread each) writing `worker_samples` samples.
    The authors' released construction of such a sample (~28 regions per source): 5.6 s on one thread."""
    import glob
    import shutil
    import tempfile

    import numpy as np
    from PIL import Image

    import copypaste
    import depth
    import toycity
    data = args.data
    if not os.path.exists(os.path.join(data, ".complete")):
        toycity.render_dataset(data, size=(384, 768), train_sequences=2, val_sequences=1, frames=3, seed=0)
    paths = [f.path for split in ("train", "val") for f in depth.list_frames(data, "cityscapes", split)]
    work = tempfile.mkdtemp(prefix="bench_copypaste_")
    for folder in ("images", "disp", "regions"):
        os.makedirs(os.path.join(work, folder))
    images, disps, regions = [], [], []
    for path in paths:
        stem, split = depth.image_stem(path), "train" if f"{os.sep}train{os.sep}" in path else "val"
        images.append(np.array(Image.open(path).convert("RGB")))
        d = depth.read_disparity_png(depth.split_file(data, "disparity", split, stem, "disparity.png"))
        disps.append(d.astype(np.float32))                      # pixels: one scale for the dataset
        inst = np.array(Image.open(depth.split_file(data, "gtFine", split, stem, "gtFine_instanceIds.png")))
        regions.append(np.unique(inst, return_inverse=True)[1].reshape(inst.shape).astype(np.int32))
    pick = [j % len(paths) for j in range(mix)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    try:
        for photometric in (True, False):
            built, cpu = [], []

            def once():
                g = torch.Generator().manual_seed(len(built))
                start = time.process_time()
                built.append(copypaste.build_sample([images[j] for j in pick], [disps[j] for j in pick],
                                                    [regions[j] for j in pick], [str(j) for j in pick],
                                                    paste_times=paste_times, generator=g, size=size,
                                                    photometric=photometric))
                cpu.append(time.process_time() - start)
            seconds = timed(once, repeat)
            what = "" if photometric else ", --no-photometric"
            rows.append(("copypaste", f"one sample M{mix} E{paste_times[0]},{paste_times[1]} {size[0]}x{size[1]}, "
                                      f"1 thread{what}", seconds, "s"))
            rows.append(("copypaste", "  its CPU time (process_time; less sensitive to a shared machine)",
                         sorted(cpu[1:])[len(cpu[1:]) // 2], "s"))
            if photometric:
                R = built[-1]["canvas_of"].shape[0]
                pasted = int((built[-1]["canvas_of"][:, 2:] >= 0).sum())
                rows.append(("copypaste", "  regions per source (mean)", R / mix, "regions"))
                rows.append(("copypaste", "  pasted copies per sample", pasted, "copies"))
        # the command with --workers 2: mix * worker_samples / 2 images (links), 2 epochs
        n_images = mix * max(1, worker_samples // 2)
        for k in range(n_images):
            j = k % len(paths)
            os.symlink(os.path.abspath(paths[j]), os.path.join(work, "images", f"img{k:04d}.png"))
            np.save(os.path.join(work, "disp", f"img{k:04d}.npy"), disps[j])
            np.save(os.path.join(work, "regions", f"img{k:04d}.npy"), regions[j])
        cli = copypaste.get_args_parser().parse_args(
            ["--work", work, "--images", os.path.join(work, "images", "*.png"), "--mix", str(mix), "--paste-times",
             *map(str, paste_times), "--size", *map(str, size), "--epochs", "2", "--workers", "2"])
        start = time.perf_counter()
        copypaste.run(cli)
        seconds = time.perf_counter() - start
        made = len(glob.glob(os.path.join(work, "samples", "epoch_*", "*.pt")))
        rows.append(("copypaste", f"command --workers 2, {made} samples incl. load + save", made / seconds,
                     "samples/s"))
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(work, ignore_errors=True)
    return rows


# ===== swav_dense =====
def bench_swav_dense(args, size=(128, 256), mix=8, arch="resnet50", num_prototypes=1000, pixel_samples=4000,
                     region_samples=7200, repeat=3):
    """Training s/step of swav_dense.py at the reference setting (one sample of 2M = 16 canvases at 128 x 256,
    ResNet-50, K 1000, 4000 pixel and 7200 region samples per canvas, fp32), the network's forward + backward
    alone (trivial loss, same SGD step) and their difference (positives, sampling, Sinkhorn, loss and their
    backward); the two are timed alternately, medians of `repeat`.

    The sample is built by copypaste.build_sample from the toy city's annotated frames (ground-truth disparity,
    instance ids as regions), then augmented per canvas. The authors' released step at this setting on the
    2-core reference machine: 12.1 s, network alone 2.8 s, everything else 9.3 s.
    """
    import copypaste
    import depth
    import numpy as np
    import swav_dense
    import toycity
    from PIL import Image
    data = args.data
    if not os.path.exists(os.path.join(data, ".complete")):
        toycity.render_dataset(data, size=(384, 768), train_sequences=2, val_sequences=1, frames=3, seed=0)
    paths = [f.path for split in ("train", "val") for f in depth.list_frames(data, "cityscapes", split)]
    images, disps, regions = [], [], []
    for j in range(mix):
        path = paths[j % len(paths)]
        stem, split = depth.image_stem(path), "train" if f"{os.sep}train{os.sep}" in path else "val"
        images.append(np.array(Image.open(path).convert("RGB")))
        d = depth.read_disparity_png(depth.split_file(data, "disparity", split, stem, "disparity.png"))
        disps.append(np.maximum(d, d[d > 0].min()))             # pixels: one scale for the dataset
        inst = np.array(Image.open(depth.split_file(data, "gtFine", split, stem, "gtFine_instanceIds.png")))
        regions.append(np.unique(inst, return_inverse=True)[1].reshape(inst.shape))
    sample = copypaste.build_sample(images, disps, regions, [f"s{j}" for j in range(mix)], size=size,
                                    generator=torch.Generator().manual_seed(0))
    batch = [{**swav_dense.augment_sample(sample, torch.Generator().manual_seed(1)), "index": 0}]
    device = torch.device(args.device)
    train_args = swav_dense.get_args_parser().parse_args(
        ["--work", ".", "--arch", arch, "--num-prototypes", str(num_prototypes), "--pixel-samples",
         str(pixel_samples), "--region-samples", str(region_samples), "--no-amp"])
    torch.manual_seed(0)
    model = swav_dense.build_model(arch, num_prototypes).to(device).train()
    optimizer = torch.optim.SGD(swav_dense.parameter_groups(model), lr=1e-4, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step():
        swav_dense.train_step(model, batch, train_args, optimizer, scaler, None, 0)
        sync()

    def network_only():
        x = batch[0]["images"].to(device)
        model.normalize_prototypes()
        optimizer.zero_grad(set_to_none=True)
        model(x).float().mean().backward()
        optimizer.step()
        sync()
    pos = swav_dense.batch_positives([{k: v.to(device) for k, v in batch[0].items() if torch.is_tensor(v)}],
                                     pixel_samples, region_samples,
                                     torch.Generator().manual_seed(swav_dense.item_seed(1, 0, 0)))  # step's draws
    counts = {k: v[2].numel() for k, v in pos.items()}
    step(), network_only()  # warm-up; then the two alternate, so that load from other jobs hits both alike
    pairs = [(timed(step, 1, 0), timed(network_only, 1, 0)) for _ in range(repeat)]
    whole, net = (sorted(x)[len(x) // 2] for x in zip(*pairs))
    H, W = size
    what = f"{2 * mix}x{H}x{W} {arch} K{num_prototypes} ({pixel_samples}+{region_samples})/canvas fp32"
    return [("swav_dense", f"train step, {what}", whole, "s/step"),
            ("swav_dense", "  network fwd+bwd+SGD alone (trivial loss)", net, "s/step"),
            ("swav_dense", "  outside the network (sampling, Sinkhorn, loss)", whole - net, "s/step"),
            ("swav_dense", "  samples in the loss (pixel-level)", counts.get("pixel", 0), "points"),
            ("swav_dense", "  samples in the loss (region-level)", counts.get("region", 0), "points")]


# ===== cluster =====
def bench_cluster(args, size=(384, 768), arch="resnet50", num_prototypes=1000, classes=19, repeat=3):
    """cluster.py at the paper's setting: agglomerative clustering of K = 1000 prototypes into 19 clusters
    (scipy linkage + cut_tree), and cluster.cluster_image on one 384 x 768 image (network forward, projections
    upsampled to 384 x 768, nearest of the K prototypes per pixel) with its confusion matrix. Random weights and
    input: the cost does not depend on them. CPU runs the network in fp32 (cluster.py --no-amp; bf16 autocast is
    much slower on CPUs without bf16 units); CUDA in fp16 autocast."""
    import numpy as np
    import cluster
    import swav_dense
    device = torch.device(args.device)
    amp_dtype = torch.float16 if device.type == "cuda" else None
    torch.manual_seed(0)
    model = swav_dense.build_model(arch, num_prototypes).to(device).eval()
    prototypes = torch.nn.functional.normalize(model.prototypes.weight.detach()[:, :, 0, 0], dim=1)
    protos_np = prototypes.cpu().numpy()
    assignment = cluster.cluster_prototypes(protos_np, classes)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    gt = rng.integers(0, classes, size).astype(np.uint8)
    x = torch.randn(1, 3, *size, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def evaluate_one():
        clusters, _ = cluster.cluster_image(model, image, prototypes, assignment, amp_dtype)
        cluster.confusion_matrix(clusters, gt, classes, classes)
        sync()

    def forward_only():
        with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            model(x)
        sync()
    H, W = size
    return [("cluster", f"prototype clustering K{num_prototypes} -> {classes} (cosine, average)",
             timed(lambda: cluster.cluster_prototypes(protos_np, classes), repeat), "s"),
            ("cluster", f"evaluation of one {H}x{W} image ({arch}, K{num_prototypes})", timed(evaluate_one, repeat),
             "s/image"),
            ("cluster", "  network forward alone", timed(forward_only, repeat), "s/image")]


# ===== finetune =====
def bench_finetune(args, size=(384, 768), arch="resnet50", repeat=2):
    """finetune.py's training step (forward, cross-entropy, backward, SGD) at the paper's crop 384 x 768 with
    ResNet-50: batch 8 on CUDA (fp16 autocast + GradScaler), batch 2 on CPU (fp32; batch 8 takes minutes per
    step there). Random images and labels: the cost does not depend on them."""
    import finetune
    device = torch.device(args.device)
    batch = 8 if device.type == "cuda" else 2
    amp_dtype = torch.float16 if device.type == "cuda" else None
    torch.manual_seed(0)
    model = finetune.SegmentationNet(arch).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=finetune.LR, momentum=finetune.MOMENTUM,
                                weight_decay=finetune.WEIGHT_DECAY)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    images = torch.randint(0, 256, (batch, *size, 3), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 19, (batch, *size), dtype=torch.uint8, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step():
        finetune.finetune_step(model, optimizer, scaler, images, labels, finetune.LR, amp_dtype)
        sync()
    seconds = timed(step, repeat)
    H, W = size
    precision = "fp16 autocast" if amp_dtype else "fp32"
    # --task instance: Mask R-CNN (detectron2's 512 RoIs per image), 16 rectangular car/person instances an image
    mask_rcnn = finetune.build_mask_rcnn(arch).to(device).train()
    optimizer = torch.optim.SGD(mask_rcnn.parameters(), lr=finetune.LR, momentum=finetune.MOMENTUM)
    ids = torch.full((batch, *size), 7, dtype=torch.int64)
    for i in range(batch):
        for k, (y, x) in enumerate(torch.randint(0, min(size) - 64, (16, 2)).tolist()):
            ids[i, y:y + 16 + 3 * k, x:x + 16 + 2 * k] = (24 if k % 2 else 26) * 1000 + k
    targets = [finetune.instance_target(i.numpy()) for i in ids]

    def instance_step():
        finetune.finetune_step(mask_rcnn, optimizer, scaler, list(images), targets, finetune.LR, amp_dtype)
        sync()
    instance_seconds = timed(instance_step, repeat)
    return [("finetune", f"train step, batch {batch} x {H}x{W} {arch} {precision}", seconds, "s/step"),
            ("finetune", "  per image", seconds / batch, "s/image"),
            ("finetune", f"instance: Mask R-CNN train step, batch {batch} x {H}x{W} {arch} {precision}",
             instance_seconds, "s/step"),
            ("finetune", "  per image", instance_seconds / batch, "s/image")]


# ===== GPU check: the CUDA path (fp16 autocast, GradScaler, channels-last) at the paper's settings =====
def gpu_check(args, amp_dtype=torch.float16, repeat=3):
    """s/step, images/s and peak memory of the training steps at the paper's settings, fp16: swav_dense (one
    sample of 16 canvases 384 x 768, ResNet-50, K 1000, 4000 + 7200 points per canvas; goal <= 16 GB, the
    paper's V100), depth (batch 12, 192 x 640, ResNet-18) and semantic fine-tuning (batch 8, 384 x 768,
    ResNet-50). --tiny: small sizes (runs on CPU in seconds, the same code). Synthetic inputs (block regions,
    a disparity ramp, random pixels): the cost does not depend on the content."""
    import numpy as np
    import copypaste
    import depth
    import finetune
    import swav_dense
    device, tiny = torch.device(args.device), args.tiny
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    mix, (H, W), arch, K, points = (1, (64, 128), "resnet18", 16, (64, 64)) if tiny else (8, (384, 768), "resnet50",
                                                                                       1000, (4000, 7200))
    gen, rows = torch.Generator().manual_seed(0), []

    def measure(stage, what, step, images):
        if device.type == "cuda":
            torch.cuda.empty_cache(), torch.cuda.reset_peak_memory_stats()
        seconds = timed(step, 1, 0) if tiny else timed(step, repeat)
        peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else float("nan")
        rows.extend([(stage, f"train step, {what}, {amp_dtype}", seconds, "s/step"),
                     (stage, "  throughput", images / seconds, "images/s"), (stage, "  peak memory", peak, "GiB")])

    # swav_dense
    regions = (np.arange(H)[:, None] // (H // 4)) * 8 + np.arange(W)[None] // (W // 8)
    sources = [torch.randint(0, 256, (3, H, W), dtype=torch.uint8, generator=gen) for _ in range(mix)]
    disps = [np.linspace(0.1, 1, H, dtype=np.float32)[:, None].repeat(W, 1)] * mix
    sample = copypaste.build_sample(sources, disps, [regions] * mix, list(map(str, range(mix))), generator=gen)
    batch = [{**swav_dense.augment_sample(sample, torch.Generator().manual_seed(1)), "index": 0}]
    train_args = swav_dense.get_args_parser().parse_args(["--work", ".", "--pixel-samples", str(points[0]),
                                                          "--region-samples", str(points[1])])
    model = swav_dense.build_model(arch, K).to(device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(swav_dense.parameter_groups(model), lr=1e-4, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type)
    measure("swav_dense", f"{2 * mix}x{H}x{W} {arch} K{K} {points[0]}+{points[1]}",
            lambda: (swav_dense.train_step(model, batch, train_args, optimizer, scaler, amp_dtype, 0), sync()), 2 * mix)
    del model, optimizer
    # depth
    b, (h, w) = (2, (64, 128)) if tiny else (12, (192, 640))
    depth_net, pose_net = depth.DepthNet("resnet18").to(device).train(), depth.PoseNet("resnet18").to(device).train()
    optimizer = torch.optim.Adam(list(depth_net.parameters()) + list(pose_net.parameters()), lr=1e-4)
    frames = torch.rand(b, 3, 3, h, w, generator=gen)
    batch = {"frames": frames, "aug": frames, "intrinsics": torch.tensor([[0.58, 1.92, 0.5, 0.5]] * b)}
    d_args = depth.get_args_parser().parse_args(["train", "--data", ".", "--work", "."])
    scaler = torch.amp.GradScaler(device.type)
    measure("depth", f"batch {b} {h}x{w} resnet18", lambda: (depth.train_step(
        depth_net, pose_net, optimizer, scaler, batch, d_args, amp_dtype), sync()), b)
    depth_net = pose_net = None  # freed before the next network (a del would hide them from the lambda above)
    # finetune (semantic)
    b = 2 if tiny else 8
    model = finetune.SegmentationNet(arch).to(device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=finetune.LR, momentum=finetune.MOMENTUM)
    images = torch.randint(0, 256, (b, H, W, 3), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 19, (b, H, W), dtype=torch.uint8, generator=gen)
    scaler = torch.amp.GradScaler(device.type)
    measure("finetune", f"batch {b} {H}x{W} {arch} semantic", lambda: (finetune.finetune_step(
        model, optimizer, scaler, images, labels, finetune.LR, amp_dtype), sync()), b)
    return rows


STAGES = ["depth", "group", "copypaste", "swav_dense", "cluster", "finetune"]


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", nargs="+", default=STAGES, choices=STAGES, help="the stages to time")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="cpu or cuda (GPU rows)")
    p.add_argument("--data", default="runs/bench/toycity", help="toy city rendered at paper size if absent")
    p.add_argument("--gpu-check", action="store_true", help="instead of --stages: the fp16 CUDA path at the paper's "
                   "settings, s/step, images/s, peak memory (`python bench.py --device cuda --gpu-check`)")
    p.add_argument("--tiny", action="store_true", help="--gpu-check at tiny sizes (runs on CPU: "
                   "`python bench.py --device cpu --gpu-check --tiny`)")
    return p


def main():
    args = get_args_parser().parse_args()
    torch.set_num_threads(args.threads)
    machine = f"{cpu_name()}, {os.cpu_count()} cores, {args.threads} torch threads"
    if args.device.startswith("cuda"):
        machine += f", GPU {torch.cuda.get_device_name()}"
    rows = gpu_check(args) if args.gpu_check else []
    for stage in [] if args.gpu_check else args.stages:
        fn = globals().get(f"bench_{stage}")
        if fn is None:
            print(f"[bench] {stage}: no bench yet")
            continue
        rows += fn(args)
    print(f"\nmachine: {machine}")
    print("| stage | what | value | unit |\n|---|---|---|---|")
    for stage, what, value, unit in rows:
        print(f"| {stage} | {what} | {value:.3g} | {unit} |")


if __name__ == "__main__":
    main()
