"""A synthetic MovieLens set in any GroupLens layout, of any size up to 32M ratings.

Shaped like the real thing: Zipf-like item popularity, every user >= 20 ratings (as in ml-1m),
ml-1m's rating distribution, per-user time spans, users/movies side files with real genre names
and occupations. And *learnable* in the two ways a recommender is judged (docs/data.md):

* **Tastes.** Users and movies share a latent space of ``_FACTORS`` dimensions. A user's vector is
  the sum of effects of their gender, age group and occupation plus a personal part; a movie's is
  the sum of its *taste cluster*'s centre, its genres' vectors and a part of its own. Each of the
  ``_CLUSTERS`` clusters favours a few genres, so genres hint at the cluster.
* **Which movies a user rates** (what Recall@k measures): a rating's movie is drawn from a taste
  cluster picked with probability ~ cluster popularity x exp(``_EXPOSURE`` x the cluster's
  appeal to the user, user . the mean vector of its movies, in standard deviations), then within
  the cluster by Zipf popularity; a share ``_POPULAR_DRAWS`` of the draws ignores tastes and
  follows global popularity alone.
* **How much they like it** (what AUC measures): stars are ml-1m's quantile cuts of user . movie
  + movie quality (correlated with popularity) + a user bias + noise.

Item popularity alone therefore predicts both somewhat; a model of users and movies predicts
more. Drawing a user's ratings per cluster (one multinomial per user) keeps generation
vectorised and linear in the number of ratings.
"""
from __future__ import annotations

import concurrent.futures as cf
import csv
import io
import json
import os
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv

from twotower_lit.data.features import AGE_GROUPS, MOVIELENS_GENRES
from twotower_lit.data.layouts import CSV_HEADER, layout_for

GENERATOR_VERSION = 5
MARKER = ".synthetic.json"
RATING_SHARES = (0.056, 0.108, 0.261, 0.349, 0.226)  # ml-1m, stars 1..5
AGE_SHARES = (0.037, 0.183, 0.347, 0.198, 0.091, 0.082, 0.063)  # ml-1m users per AGE_GROUPS entry
# ml-1m's genre frequencies (share of movies having the genre), MOVIELENS_GENRES order
GENRE_SHARES = (0.13, 0.07, 0.03, 0.07, 0.31, 0.05, 0.03, 0.41, 0.02, 0.01, 0.09, 0.03, 0.03, 0.12,
                0.07, 0.13, 0.04, 0.02)
ML100K_OCCUPATIONS = ("administrator", "artist", "doctor", "educator", "engineer", "entertainment",
                      "executive", "healthcare", "homemaker", "lawyer", "librarian", "marketing", "none",
                      "other", "programmer", "retired", "salesman", "scientist", "student", "technician",
                      "writer")
# Time windows of the real sets (Unix seconds)
_TIME_WINDOW = {"ml-100k": (874_724_710, 893_286_638), "ml-1m": (956_703_932, 1_046_454_590),
                "ml-10m": (789_652_009, 1_231_131_736)}
_CSV_WINDOW = (828_124_615, 1_697_164_143)
_SALT = 0x5EED_DA7A
_CHUNK = 1 << 22

# The taste model (see the module docstring and docs/data.md); calibrated so that item popularity,
# a rated-pairs-only model and the default two-tower differ on the default set about as on ml-100k.
_FACTORS = 8             # latent dimensions shared by users and movies
_CLUSTERS = 24           # taste clusters of movies
_SIDE_WEIGHT = 0.6       # share of a user's vector set by gender, age group and occupation
_GENRE_WEIGHT = 0.6      # share of a movie's vector set by its genres (the rest: its cluster, itself)
_EXPOSURE = 3.0          # how strongly tastes steer which movies a user rates (standard deviations)
_POPULAR_DRAWS = 0.2     # share of ratings whose movie follows global popularity alone
_LIKING = 0.7            # weight of user . movie in the liking score
_QUALITY = 0.45          # spread of the movies' quality (half of it follows popularity)
_NOISE = 0.8             # spread of the per-rating noise of the liking score

Log = Callable[[str], None]


def synthetic_dir(cfg, output_dir: str) -> str:
    """Where ``--synthetic`` writes raw files: OUTPUT/raw for a local output, else the cache."""
    if not output_dir.startswith("s3://"):
        return os.path.join(os.path.abspath(os.path.expanduser(output_dir)), "raw")
    name = f"synthetic-{cfg.synthetic_layout}-{cfg.synthetic}-seed{cfg.seed}"
    return os.path.join(os.path.abspath(os.path.expanduser(cfg.cache_dir)), name)


def generate_movielens(out_dir: str, n_ratings: int, layout: str = "ml-1m", seed: int = 0,
                       log: Optional[Log] = print) -> dict:
    """Write a synthetic set with ``n_ratings`` ratings in ``layout`` to ``out_dir``; returns its
    spec. Skipped (same spec returned) when ``out_dir`` already holds this exact set."""
    if n_ratings < 1:
        raise ValueError(f"--synthetic needs a positive number of ratings, got {n_ratings}")
    spec = {"n_ratings": int(n_ratings), "layout": layout, "seed": int(seed), "version": GENERATOR_VERSION}
    marker = os.path.join(out_dir, MARKER)
    if os.path.isfile(marker):
        with open(marker) as f:
            if json.load(f) == spec:
                if log:
                    log(f"synthetic: {out_dir} already holds {n_ratings:,} ratings ({layout}, seed {seed}); reused")
                return spec
        os.remove(marker)  # a different set is about to overwrite the files
    os.makedirs(out_dir, exist_ok=True)
    lay = layout_for(layout)
    rng = np.random.default_rng([seed, _SALT])

    n_users, n_items, per_user = _shape(n_ratings, rng)
    item_ids = np.sort(rng.choice(int(n_items * 1.2) + 1, n_items, replace=False)).astype(np.int64) + 1
    rank_to_item, popularity = _zipf_popularity(n_items, rng)
    users = _draw_users(n_users, rng)
    movies = _draw_movies(popularity, rng)
    tastes = _tastes(users, movies, rng)
    user, item = _sample_pairs(per_user, n_items, lambda n, r: _draw_items(n, tastes, movies, rank_to_item, r), rng)
    rating = _ratings(user, item, tastes, popularity, rng)
    timestamp = _timestamps(user, n_users, lay.name, rng)

    _write_ratings(out_dir, lay, user + 1, item_ids[item], rating, timestamp, rng)
    years = np.clip(np.round(2023 - rng.exponential(18.0, n_items)), 1919, 2023).astype(int)
    _write_movies(out_dir, lay, item_ids, movies.genre_hot, years)
    if lay.users_file:
        _write_users(out_dir, lay, users, rng)
    with open(marker, "w") as f:
        json.dump(spec, f)
    if log:
        log(f"synthetic: wrote {len(user):,} ratings, {n_users:,} users, {n_items:,} items ({layout}) to {out_dir}")
    return spec


def _shape(n: int, rng: np.random.Generator) -> Tuple[int, int, np.ndarray]:
    """(users, items, ratings per user): ~150 per user (ml-1m: 165), each >= 20, long-tailed."""
    n_users = max(1, min(n // 20, int(round(n / 150))))
    n_items = max(50, int(4 * np.sqrt(n)), int(np.ceil(3 * n / n_users)) if n_users > 1 else 50)
    if n_users == 1:
        return 1, max(n_items, 2 * n), np.array([n])
    extra = rng.lognormal(0.0, 1.1, n_users)
    budget = n - 20 * n_users
    counts = 20 + np.floor(extra / extra.sum() * budget).astype(np.int64)
    cap = n_items // 2
    counts = np.minimum(counts, cap)
    while counts.sum() < n:  # hand out the rounding remainder (and what the cap cut) to users with room
        room = np.flatnonzero(counts < cap)
        add = rng.choice(room, min(len(room), n - int(counts.sum())), replace=False)
        counts[add] += 1
    return n_users, n_items, counts


_ZIPF_S, _ZIPF_OFFSET = 0.9, 10.0  # P(rank r) ~ 1 / (r + 10)^0.9


def _zipf_cdf(x, n_items: int):
    lo, hi = _ZIPF_OFFSET ** (1 - _ZIPF_S), (n_items + _ZIPF_OFFSET) ** (1 - _ZIPF_S)
    return ((np.asarray(x, float) + _ZIPF_OFFSET) ** (1 - _ZIPF_S) - lo) / (hi - lo)


def _zipf_popularity(n_items: int, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """(item index of each popularity rank, sampling probability of each item index)."""
    rank_to_item = rng.permutation(n_items)
    edges = _zipf_cdf(np.arange(n_items + 1), n_items)
    popularity = np.empty(n_items)
    popularity[rank_to_item] = np.diff(edges)
    return rank_to_item, popularity


@dataclass
class _Users:
    gender: np.ndarray       # 1 = M
    age: np.ndarray          # index into AGE_GROUPS
    occupation: np.ndarray   # index into ML100K_OCCUPATIONS (ml-1m's codes 0..20)


@dataclass
class _Movies:
    cluster: np.ndarray      # taste cluster of each movie
    genre_hot: np.ndarray    # (movies, genres) bool
    order: np.ndarray        # movie indices sorted by cluster
    starts: np.ndarray       # cluster k's movies are order[starts[k]:starts[k + 1]]
    accept: np.ndarray       # alias tables over `order`, each cluster's slots apart (_alias_tables):
    alias: np.ndarray        # slot j gives order[j] with probability accept[j], else movie alias[j]
    weight: np.ndarray       # each cluster's share of all popularity


@dataclass
class _Tastes:
    user: np.ndarray         # (users, _FACTORS)
    movie: np.ndarray        # (movies, _FACTORS)
    cluster_pick: np.ndarray  # (users, clusters): probability that a taste-led draw lands in each cluster


def _draw_users(n_users: int, rng: np.random.Generator) -> _Users:
    return _Users(gender=np.where(rng.random(n_users) < 0.72, 1, 0),
                  age=rng.choice(len(AGE_GROUPS), n_users, p=np.asarray(AGE_SHARES) / sum(AGE_SHARES)),
                  occupation=rng.integers(0, len(ML100K_OCCUPATIONS), n_users))


def _draw_movies(popularity: np.ndarray, rng: np.random.Generator) -> _Movies:
    """Each movie's cluster and genres: its first genre mostly from its cluster's favourite few."""
    n_items, n_genres = len(popularity), len(MOVIELENS_GENRES)
    shares = np.asarray(GENRE_SHARES) / sum(GENRE_SHARES)
    cluster = rng.integers(0, _CLUSTERS, n_items)
    favourite = rng.dirichlet(np.full(n_genres, 0.3) * shares * n_genres, _CLUSTERS)  # few genres each
    first = np.where(rng.random(n_items) < 0.8,
                     (favourite.cumsum(1)[cluster] < rng.random((n_items, 1))).sum(1).clip(0, n_genres - 1),
                     rng.choice(n_genres, n_items, p=shares))
    genre_hot = rng.random((n_items, n_genres)) < np.asarray(GENRE_SHARES) * 0.8
    genre_hot[np.arange(n_items), first] = True
    order = np.argsort(cluster, kind="stable")
    starts = np.searchsorted(cluster[order], np.arange(_CLUSTERS + 1))
    weight = np.bincount(cluster, popularity, _CLUSTERS)
    accept, alias = _alias_tables(popularity[order], starts)
    return _Movies(cluster, genre_hot, order, starts, accept, order[alias], weight / weight.sum())


def _alias_tables(weights: np.ndarray, starts: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Walker's alias tables of each segment ``starts[k]:starts[k + 1]`` of ``weights``: slot j
    keeps its own entry with probability ``accept[j]``, else takes ``alias[j]`` (an index into
    ``weights``), so a draw in proportion to the weights is two uniform numbers, no search."""
    accept = np.ones(len(weights))
    alias = np.arange(len(weights))
    for k in range(len(starts) - 1):
        lo, hi = int(starts[k]), int(starts[k + 1])
        if hi - lo < 2:
            continue
        scaled = weights[lo:hi] * (hi - lo) / weights[lo:hi].sum()
        small = [j for j in range(hi - lo) if scaled[j] < 1.0]
        large = [j for j in range(hi - lo) if scaled[j] >= 1.0]
        while small and large:
            j, g = small.pop(), large[-1]
            accept[lo + j], alias[lo + j] = scaled[j], lo + g
            scaled[g] -= 1.0 - scaled[j]
            if scaled[g] < 1.0:
                small.append(large.pop())
    return accept, alias


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.sqrt((x * x).sum(1, keepdims=True) + 1e-12)


def _tastes(users: _Users, movies: _Movies, rng: np.random.Generator) -> _Tastes:
    """Latent vectors of users (side features + personal) and movies (cluster + genres + own)."""
    d, n_genres = _FACTORS, len(MOVIELENS_GENRES)
    side = (rng.normal(0, 1, (2, d))[users.gender] + rng.normal(0, 1, (len(AGE_GROUPS), d))[users.age]
            + rng.normal(0, 1, (len(ML100K_OCCUPATIONS), d))[users.occupation])
    user = np.sqrt(_SIDE_WEIGHT) * _unit_rows(side) + np.sqrt(1 - _SIDE_WEIGHT) * _unit_rows(
        rng.normal(0, 1, (len(users.gender), d)))
    centre = _unit_rows(rng.normal(0, 1, (_CLUSTERS, d)))
    genre_vec = _unit_rows(rng.normal(0, 1, (n_genres, d)))
    hot = movies.genre_hot.astype(float)
    by_genres = _unit_rows(hot @ genre_vec / hot.sum(1, keepdims=True))
    own = _unit_rows(rng.normal(0, 1, (len(movies.cluster), d)))
    movie = (np.sqrt(_GENRE_WEIGHT) * by_genres + np.sqrt((1 - _GENRE_WEIGHT) * 0.7) * centre[movies.cluster]
             + np.sqrt((1 - _GENRE_WEIGHT) * 0.3) * own)
    user = np.sqrt(d) * user  # so that user . movie has about unit variance
    # a cluster's appeal to a user: user . the mean vector of the cluster's movies
    mean_movie = np.zeros((_CLUSTERS, d))
    np.add.at(mean_movie, movies.cluster, movie)
    mean_movie /= np.maximum(np.bincount(movies.cluster, minlength=_CLUSTERS), 1)[:, None]
    appeal = user @ mean_movie.T
    appeal = (appeal - appeal.mean()) / (appeal.std() + 1e-12)  # _EXPOSURE is in standard deviations
    with np.errstate(divide="ignore"):  # a cluster without movies (tiny sets) is never picked
        logits = _EXPOSURE * appeal + np.log(movies.weight)
    pick = np.exp(logits - logits.max(1, keepdims=True))
    pick /= pick.sum(1, keepdims=True)
    return _Tastes(user.astype(np.float32), movie.astype(np.float32), pick)


def _draw_items(wanted: np.ndarray, tastes: _Tastes, movies: _Movies, rank_to_item: np.ndarray,
                rng: np.random.Generator) -> np.ndarray:
    """``wanted[u]`` movies for each user u, user after user: each led by taste (a cluster from
    the user's cluster probabilities, then a movie of it by popularity) or by popularity alone."""
    n_users = len(wanted)
    popular = rng.binomial(wanted, _POPULAR_DRAWS)
    per_cluster = rng.multinomial(wanted - popular, tastes.cluster_pick)  # (users, clusters)
    # per user: its popularity-led draws, then its taste-led ones cluster by cluster
    counts = np.concatenate([popular[:, None], per_cluster], 1).ravel()
    route = np.repeat(np.tile(np.arange(-1, _CLUSTERS, dtype=np.int32), n_users), counts)
    out = np.empty(len(route), np.int64)
    for s in range(0, len(route), _CHUNK):
        k = route[s:s + _CHUNK]
        by_pop = k < 0
        item = np.empty(len(k), np.int64)
        item[by_pop] = _draw_popular(int(by_pop.sum()), rank_to_item, rng)
        kk = k[~by_pop]
        size = movies.starts[kk + 1] - movies.starts[kk]
        slot = movies.starts[kk] + np.minimum((rng.random(len(kk)) * size).astype(np.int64), size - 1)
        item[~by_pop] = np.where(rng.random(len(kk)) < movies.accept[slot], movies.order[slot], movies.alias[slot])
        out[s:s + _CHUNK] = item
    return out


def _draw_popular(total: int, rank_to_item: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Item indices by popularity, by inverting the Zipf CDF in closed form (no 32M searchsorted)."""
    n_items = len(rank_to_item)
    lo, hi = _ZIPF_OFFSET ** (1 - _ZIPF_S), (n_items + _ZIPF_OFFSET) ** (1 - _ZIPF_S)
    x = (lo + rng.random(total) * (hi - lo)) ** (1 / (1 - _ZIPF_S)) - _ZIPF_OFFSET
    return rank_to_item[np.minimum(x.astype(np.int64), n_items - 1)]


def _sample_pairs(per_user: np.ndarray, n_items: int,
                  draw: Callable[[np.ndarray, np.random.Generator], np.ndarray], rng: np.random.Generator):
    """Distinct (user, item) pairs, ``per_user[u]`` for user u; ``draw(counts, rng)`` gives
    ``counts[u]`` items for each user u in turn.

    Draw with replacement, drop repeats, redraw the shortfall; after a few rounds the shortfall
    is drawn uniformly so heavy users always finish."""
    accepted = np.zeros(0, np.int64)   # sorted keys user * n_items + item
    extra = np.zeros(0, np.int64)      # later rounds, small: kept apart so no 32M re-sort per round
    deficit = per_user.astype(np.int64)
    for round_ in range(100):
        total = int(deficit.sum())
        if total == 0:
            break
        users = np.repeat(np.arange(len(per_user), dtype=np.int64), deficit)
        items = draw(deficit, rng) if round_ < 6 else rng.integers(0, n_items, total)
        keys = np.sort(users * n_items + items)
        del users, items
        keys = keys[np.concatenate([[True], keys[1:] != keys[:-1]])]
        for seen in (accepted, extra):
            if seen.size:
                pos = np.minimum(np.searchsorted(seen, keys), seen.size - 1)
                keys = keys[seen[pos] != keys]
        if round_ == 0:
            accepted = keys
            have = np.bincount(accepted // n_items, minlength=len(per_user))
        else:
            extra = np.sort(np.concatenate([extra, keys]))
            have = have + np.bincount(keys // n_items, minlength=len(per_user))
        deficit = per_user - have
    keys = np.sort(np.concatenate([accepted, extra])) if extra.size else accepted
    return keys // n_items, keys % n_items


def _ratings(user, item, tastes: _Tastes, popularity, rng) -> np.ndarray:
    """1..5 stars: the liking score (user . movie + quality + user bias + noise) cut at ml-1m's
    rating quantiles."""
    log_pop = np.log(popularity)
    z = (log_pop - log_pop.mean()) / log_pop.std()
    quality = (_QUALITY * (0.7 * z + 0.7 * rng.normal(0, 1, len(popularity)))).astype(np.float32)
    user_bias = rng.normal(0, 0.3, len(tastes.user)).astype(np.float32)
    p, q = tastes.user * np.float32(_LIKING), tastes.movie
    score = np.empty(len(user), np.float32)
    for s in range(0, len(user), _CHUNK):
        u, i = user[s:s + _CHUNK], item[s:s + _CHUNK]
        chunk = np.einsum("ij,ij->i", p[u], q[i]) + quality[i] + user_bias[u]
        chunk += rng.normal(0, _NOISE, len(u)).astype(np.float32)
        score[s:s + _CHUNK] = chunk
    sample = score if len(score) <= 2_000_000 else score[rng.integers(0, len(score), 2_000_000)]
    cuts = np.quantile(sample, np.cumsum(RATING_SHARES)[:-1])
    return (np.searchsorted(cuts, score) + 1).astype(np.int8)


def _timestamps(user, n_users: int, dataset: str, rng) -> np.ndarray:
    """Each user is active from a sign-up time over a long-tailed span (days to years)."""
    lo, hi = _TIME_WINDOW.get(dataset, _CSV_WINDOW)
    start = rng.integers(lo, hi, n_users)
    span = np.minimum(rng.lognormal(np.log(30 * 86400), 1.5, n_users), hi - start).astype(np.int64)
    return start[user] + (rng.random(len(user)) * span[user]).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# writers


def _write_ratings(out_dir, lay, user_id, item_id, stars, timestamp, rng) -> None:
    n = len(user_id)
    if lay.header:  # CSV sets write "4.0"
        rating = pa.array([f"{s}.0" for s in range(6)]).take(pa.array(stars.astype(np.int64)))
    elif lay.name == "ml-10m":
        # Half a star above every fourth rating below 5, as ml-10m has them (and ml-1m never does):
        # the labels at the default threshold (4) are those of the whole stars.
        half = (stars < 5) & ((user_id * 31 + item_id) % 4 == 0)
        rating = pa.array([f"{v / 2:g}" for v in range(11)]).take(pa.array(2 * stars.astype(np.int64) + half))
    else:
        rating = pa.array(stars)
    if lay.name == "ml-100k":  # u.data is in random order
        order = rng.permutation(n)
        user_id, item_id, rating, timestamp = (user_id[order], item_id[order], rating.take(pa.array(order)),
                                               timestamp[order])
    if lay.delimiter == "::":
        gap = pa.nulls(n)  # ':' + empty column + ':' writes '::'
        table = pa.table({"u": user_id, "a": gap, "i": item_id, "b": gap, "r": rating, "c": gap, "t": timestamp})
        delimiter = ":"
    else:
        table = pa.table({"u": user_id, "i": item_id, "r": rating, "t": timestamp})
        delimiter = lay.delimiter
    options = pcsv.WriteOptions(include_header=False, delimiter=delimiter, quoting_style="none")

    def render(start: int) -> pa.Buffer:
        sink = pa.BufferOutputStream()
        pcsv.write_csv(table.slice(start, _CHUNK), sink, options)
        return sink.getvalue()

    workers = max(1, min(4, os.cpu_count() or 1))
    starts = list(range(0, n, _CHUNK))
    with open(os.path.join(out_dir, lay.ratings_file), "wb") as f, cf.ThreadPoolExecutor(workers) as pool:
        if lay.header:
            f.write((",".join(CSV_HEADER) + "\n").encode())
        # Arrow formats slices in parallel (it releases the GIL); one wave at a time bounds memory.
        for wave in range(0, len(starts), workers):
            for buf in pool.map(render, starts[wave:wave + workers]):
                f.write(buf)


def _title(k: int, year: int) -> str:
    # Every 7th title has an article after a comma (quoted in CSV), every 11th a Latin-1 accent.
    name = f"Synthetic Movie {k}"
    if k % 7 == 0:
        name = f"{name}, The"
    if k % 11 == 0:
        name = f"Café {name}"
    return f"{name} ({year})"


def _write_movies(out_dir, lay, item_ids, genre_hot, years) -> None:
    path = os.path.join(out_dir, lay.movies_file)
    genre_names = list(MOVIELENS_GENRES)
    if lay.header:  # ml-20m and later say "Children"
        genre_names = [g.replace("Children's", "Children") for g in genre_names]
    if lay.name == "ml-100k":
        with open(path, "w", encoding="latin-1", newline="\n") as f:
            for k, (mid, hot, year) in enumerate(zip(item_ids, genre_hot, years)):
                flags = "|".join(["0"] + ["1" if h else "0" for h in hot])
                f.write(f"{mid}|{_title(k, year)}|01-Jan-{year}||http://example.invalid/{mid}|{flags}\n")
        with open(os.path.join(out_dir, "u.genre"), "w", encoding="latin-1") as f:
            for i, g in enumerate(("unknown",) + MOVIELENS_GENRES):
                f.write(f"{g}|{i}\n")
        return
    rows = [(int(mid), _title(k, year), "|".join(g for g, h in zip(genre_names, hot) if h))
            for k, (mid, hot, year) in enumerate(zip(item_ids, genre_hot, years))]
    if lay.header:
        buf = io.StringIO(newline="")
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(("movieId", "title", "genres"))
        writer.writerows(rows)
        with open(path, "w", encoding="utf-8", newline="") as f:
            f.write(buf.getvalue())
    else:
        with open(path, "w", encoding="latin-1", newline="\n") as f:
            f.writelines(f"{mid}::{title}::{genres}\n" for mid, title, genres in rows)


def _write_users(out_dir, lay, users: _Users, rng) -> None:
    n, age_codes = len(users.gender), users.age
    zips = rng.integers(1000, 99999, n)
    gender = np.where(users.gender == 1, "M", "F")
    path = os.path.join(out_dir, lay.users_file)
    if lay.name == "ml-100k":  # raw ages inside each ml-1m group, occupation names
        bounds = list(AGE_GROUPS[1:]) + [74]
        low = np.where(np.asarray(AGE_GROUPS)[age_codes] == 1, 7, np.asarray(AGE_GROUPS)[age_codes])
        age = low + (rng.random(n) * (np.asarray(bounds)[age_codes] - low)).astype(int)
        occupation = np.asarray(ML100K_OCCUPATIONS)[users.occupation]
        lines = (f"{u + 1}|{age[u]}|{gender[u]}|{occupation[u]}|{zips[u]:05d}\n" for u in range(n))
        with open(os.path.join(out_dir, "u.occupation"), "w") as f:
            f.writelines(o + "\n" for o in ML100K_OCCUPATIONS)
    else:
        occupation = users.occupation  # ml-1m's codes 0..20
        lines = (f"{u + 1}::{gender[u]}::{AGE_GROUPS[age_codes[u]]}::{occupation[u]}::{zips[u]:05d}\n"
                 for u in range(n))
    with open(path, "w", encoding="latin-1", newline="\n") as f:
        f.writelines(lines)
